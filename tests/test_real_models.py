"""Behaviour on the real packaged models (converted once, cached under ITDA_CACHE)."""

import contextlib

import pytest
import torch

from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint, StopForward, capture
from itda.activations.models import load_model
from itda.activations.stream import FP16_MAX, iterate_batches
from itda.builder import BuildConfig
from itda.builder.from_model import build_from_model

pytestmark = pytest.mark.slow


def test_smollm2_shape_and_hookpoints(smollm2, smollm2_contexts):
    _, ctx = smollm2_contexts
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576) and smollm2.is_causal
    ids, mask = ctx.input_ids[:4], ctx.attention_mask[:4]
    with torch.inference_mode():
        hs = smollm2.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hps = [Hookpoint("resid_post", 15), Hookpoint("resid_pre", 0), Hookpoint("resid_post", 28)]
    with torch.inference_mode(), capture(smollm2.model, hps) as store, contextlib.suppress(StopForward):
        smollm2.model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(store[hps[0]], hs[16])
    torch.testing.assert_close(store[hps[1]], hs[0])
    torch.testing.assert_close(store[hps[2]], hs[29])


def test_smollm2_atoms_are_real_activations_with_their_text(smollm2, smollm2_contexts):
    docs, ctx = smollm2_contexts
    hp = Hookpoint("resid_post", 15)
    res = build_from_model(smollm2, [hp], ctx, BuildConfig(k=40, min_cosine=0.85), progress=False)
    d = res.dictionaries[hp]
    assert len(d) > 50 and d.meta.dataset_fingerprint == ctx.fingerprint and d.meta.hookpoint == "resid_post.15"
    # the text span of every atom is its token
    for doc, pos, cs, ce, tid in d.refs.tolist():
        assert pos >= 0 and smollm2.tokenizer.decode([tid]).strip() == docs[doc][cs:ce].strip()
    # and each atom is the normalised activation of that token
    fp32 = torch.cat([b[hp].dense() for b in iterate_batches(smollm2.model, [hp], ctx, dtype=torch.float32)])
    refs = torch.cat([b[hp].refs for b in iterate_batches(smollm2.model, [hp], ctx, dtype=torch.float32)])
    key = {(r[0], r[1]): i for i, r in enumerate(refs.tolist())}
    rows = torch.tensor([key[(r[0], r[1])] for r in d.refs.tolist()])
    want = fp32[rows] / fp32[rows].norm(dim=1, keepdim=True)
    assert float((want * d.atoms).sum(1).min()) > 0.9999


def test_gemma3_overflow_is_streamed_without_loss():
    lm = load_model("gemma3-270m")
    assert (lm.config.num_hidden_layers, lm.config.hidden_size) == (18, 640)
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=1024)
    hp = Hookpoint("resid_post", 10)
    half = list(iterate_batches(lm.model, [hp], ctx, dtype=torch.float16, include_special=True))
    full = list(iterate_batches(lm.model, [hp], ctx, dtype=torch.float32, include_special=True))
    peak = max(b[hp].max_abs for b in half)
    assert peak > FP16_MAX  # gemma's residual stream leaves the fp16 range
    for h, f in zip(half, full, strict=True):
        assert torch.isfinite(h[hp].unit).all()
        x = f[hp].dense()
        torch.testing.assert_close(h[hp].dense(), x, rtol=2e-3, atol=2e-3 * float(x.abs().max()))
    res = build_from_model(lm, [hp], ctx, BuildConfig(k=20, min_cosine=0.8), progress=False)
    atoms = res.dictionaries[hp].atoms
    assert torch.isfinite(atoms).all() and torch.allclose(atoms.norm(dim=1), torch.ones(len(atoms)), atol=1e-4)


def test_minilm_encoder():
    lm = load_model("minilm-l6")
    assert not lm.is_causal and (lm.config.num_hidden_layers, lm.config.hidden_size) == (6, 384)
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=512)
    ids, mask = ctx.input_ids[:2], ctx.attention_mask[:2]
    with torch.inference_mode():
        hs = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    hps = [Hookpoint("resid_post", L) for L in range(6)]
    with torch.inference_mode(), capture(lm.model, hps, stop_early=False) as store:
        lm.model(input_ids=ids, attention_mask=mask)
    for L in range(6):
        torch.testing.assert_close(store[hps[L]], hs[L + 1])
    # CLS first (special), never an atom by default
    assert ctx.special[:, 0].all()
    res = build_from_model(lm, [hps[3]], ctx, BuildConfig(k=10, min_cosine=0.8), progress=False)
    assert (res.dictionaries[hps[3]].refs[:, 1] >= 0).all()


def test_smollm2_layerwise_matches_in_memory(smollm2, smollm2_contexts):
    _, ctx = smollm2_contexts
    lw = load_model("smollm2-135m", layerwise=True, max_layer=15, micro_batch=3)
    hp = [Hookpoint("resid_post", 15)]
    want = next(iterate_batches(smollm2.model, hp, ctx.rows(0, 8), dtype=torch.float32))[hp[0]].dense()
    got = next(iterate_batches(lw.model, hp, ctx.rows(0, 8), dtype=torch.float32))[hp[0]].dense()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    lw.layerwise.close()


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "minilm-l6"])
def test_model_folders_load_in_automodel_and_the_lm_class_with_nothing_missing(name):
    """The folder itda loads (a converted GGUF checkpoint, or the package's own) is complete for the base class
    other tools load (AutoModel: sparsify, nnsight) and for the causal-LM class, and gives itda's hidden states."""
    from transformers import AutoModel, AutoModelForCausalLM

    from itda.activations.models import available_models, resolve_model_source

    if name not in available_models():
        pytest.skip(f"{name} is not installed")
    lm = load_model(name, device="cpu")
    folder = resolve_model_source(name)
    classes = [AutoModel, AutoModelForCausalLM] if lm.is_causal else [AutoModel]
    ids = torch.tensor([[lm.tokenizer.bos_token_id or lm.tokenizer.cls_token_id or 0, 400, 1200, 37, 9000, 15]])
    with torch.no_grad():
        ours = lm.model(ids, output_hidden_states=True).hidden_states
    for auto in classes:
        model, info = auto.from_pretrained(folder, local_files_only=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["mismatched_keys"], (auto.__name__, info)
        with torch.no_grad():
            theirs = model.eval()(ids, output_hidden_states=True).hidden_states
        middle = len(ours) // 2
        torch.testing.assert_close(theirs[middle], ours[middle], rtol=0, atol=0)
