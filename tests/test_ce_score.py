import torch
import torch.nn.functional as F
from tiny_models import sample_docs, tiny_model, word_tokenizer

from itda.activations.corpus import tokenize_contexts
from itda.activations.hookpoints import Hookpoint
from itda.dictionary import Dictionary, DictionaryMeta
from itda.evaluation.ce_score import ce_loss_score


def _direct_ce(model, ctx, zero_layer=None):
    """Next-token CE over real targets, optionally zeroing block zero_layer's output at text positions."""
    handle = None
    if zero_layer is not None:
        text = ~ctx.special

        def hook(m, i, o):
            h = o[0] if isinstance(o, tuple) else o
            h = h * (~text)[..., None].to(h.dtype)
            return (h,) + tuple(o[1:]) if isinstance(o, tuple) else h

        handle = model.model.layers[zero_layer].register_forward_hook(hook)
    with torch.inference_mode():
        logits = model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits
    if handle:
        handle.remove()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ctx.input_ids[:, 1:], reduction="none")
    ok = ctx.attention_mask[:, 1:] > 0
    return float(losses[ok].mean())


def test_ce_score_matches_direct_computation():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    ctx = tokenize_contexts(sample_docs(), range(8), tok, context=32)
    d = model.config.hidden_size
    # +-e_i atoms: MP with k = d reconstructs exactly, so the spliced run equals the clean one
    atoms = torch.cat([torch.eye(d), -torch.eye(d)])
    exact = Dictionary(atoms, meta=DictionaryMeta(d=d, k=d))
    hp = Hookpoint("resid_post", 1)
    res = ce_loss_score(model, exact, hp, ctx, batch_contexts=3)
    assert abs(res.ce_clean - _direct_ce(model, ctx)) < 1e-4
    assert abs(res.ce_zero - _direct_ce(model, ctx, zero_layer=1)) < 1e-4
    assert abs(res.ce_spliced - res.ce_clean) < 1e-4 and abs(res.score - 1) < 1e-3
    # a one-atom dictionary with k = 1 loses most of the signal: the score drops below 1
    poor = Dictionary(torch.eye(d)[:1], meta=DictionaryMeta(d=d, k=1))
    worse = ce_loss_score(model, poor, hp, ctx, batch_contexts=3)
    assert worse.ce_spliced > res.ce_spliced
    assert worse.tokens == res.tokens == int((ctx.attention_mask[:, 1:] > 0).sum())


def test_ce_score_with_an_sae_spliced_in():
    from itda.sae import SaeConfig, TopKSAE

    tok = word_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    ctx = tokenize_contexts(sample_docs(), range(8), tok, context=32)
    d = model.config.hidden_size
    hp = Hookpoint("resid_post", 1)
    # latents +-e_i with k = d: relu keeps each coordinate's sign, the reconstruction is exact
    exact = TopKSAE(SaeConfig(d, 2 * d, d))
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        exact.W_dec.copy_(exact.W_enc)
    res = ce_loss_score(model, exact, hp, ctx, batch_contexts=3)
    assert abs(res.ce_clean - _direct_ce(model, ctx)) < 1e-4
    assert abs(res.ce_spliced - res.ce_clean) < 1e-4 and abs(res.score - 1) < 1e-3
    poor = TopKSAE(SaeConfig(d, 2 * d, 1))
    with torch.no_grad():
        poor.W_enc.copy_(exact.W_enc)
        poor.W_dec.copy_(exact.W_dec)
    assert ce_loss_score(model, poor, hp, ctx, batch_contexts=3).ce_spliced > res.ce_spliced
