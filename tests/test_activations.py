import contextlib
import json

import pytest
import torch
from tiny_models import sample_docs, tiny_model, word_tokenizer

from itda.activations.corpus import load_contexts, read_documents, split_documents, tokenize_contexts
from itda.activations.hookpoints import Hookpoint, StopForward, capture, parse_hookpoint, resolve_module
from itda.activations.stream import iterate_batches, to_act_batch
from itda.errors import ItdaInputError

ARCHS = ["llama", "qwen2", "gemma3", "gpt2", "bert"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("15", Hookpoint("resid_post", 15)),
        ("resid_post 3", Hookpoint("resid_post", 3)),
        ("resid_pre.2", Hookpoint("resid_pre", 2)),
        ("blocks.12.hook_mlp_out", Hookpoint("mlp_out", 12)),
        ("blocks.0.hook_attn_out", Hookpoint("attn_out", 0)),
        ("model.layers.4.mlp", Hookpoint("module", 4, "model.layers.4.mlp")),
    ],
)
def test_parse_hookpoint(text, expected):
    assert parse_hookpoint(text) == expected


def test_parse_hookpoint_rejects_garbage():
    with pytest.raises(ItdaInputError, match="cannot parse"):
        parse_hookpoint("blocks 3 ???")


def _ids(seed=0, batch=2, seq=24, vocab=128):
    return torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_resid_hooks_match_hidden_states(arch):
    model = tiny_model(arch)
    ids = _ids()
    with torch.inference_mode():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(hs) - 1
    hps = [Hookpoint("resid_post", L) for L in range(n - 1)] + [Hookpoint("resid_pre", L) for L in range(n)]
    with torch.inference_mode(), capture(model, hps, stop_early=False) as store:
        model(input_ids=ids)
    for L in range(n - 1):  # the last entry of hidden_states is after the final norm in decoder LMs
        torch.testing.assert_close(store[Hookpoint("resid_post", L)], hs[L + 1])
    for L in range(n):
        torch.testing.assert_close(store[Hookpoint("resid_pre", L)], hs[L])


# pre-LN architectures only: BERT (post-LN) and Gemma 3 (post-sublayer norms) normalise the
# sublayer outputs before adding them to the residual stream
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sublayer_hooks_sum_to_residual_update(arch):
    model = tiny_model(arch)
    ids = _ids(1)
    hps = [Hookpoint(k, 1) for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    with torch.inference_mode(), capture(model, hps, stop_early=False) as s:
        model(input_ids=ids)
    pre, attn, mlp, post = (s[h] for h in hps)
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-4, atol=1e-5)


def test_forward_stops_after_deepest_layer():
    model = tiny_model("llama")
    calls = []
    model.model.layers[3].register_forward_hook(lambda *a: calls.append(3))
    with (
        torch.inference_mode(),
        capture(model, [Hookpoint("resid_post", 1)]) as store,
        contextlib.suppress(StopForward),
    ):
        model(input_ids=_ids())
    assert Hookpoint("resid_post", 1) in store and calls == []


def test_layer_out_of_range():
    with pytest.raises(ItdaInputError, match="out of range"):
        resolve_module(tiny_model("gpt2"), Hookpoint("resid_post", 9))


def test_contexts_refs_point_at_the_token_text():
    tok = word_tokenizer()
    docs = sample_docs()
    ctx = tokenize_contexts(docs, range(len(docs)), tok, context=32, tokenizer_name="w")
    assert ctx.input_ids.shape[1] == 32
    real = ctx.refs[..., 0] >= 0
    for (doc, pos, cs, ce, tid), is_real in zip(ctx.refs.view(-1, 5).tolist(), real.view(-1).tolist(), strict=True):
        if not is_real or pos < 0:
            continue
        assert docs[doc][cs:ce] == tok.convert_ids_to_tokens(tid)
    # BOS first in every context, special; positions count the document's tokens from 0
    assert (ctx.input_ids[:, 0] == tok.bos_token_id).all() and ctx.special[:, 0].all()
    first_doc = ctx.refs[ctx.refs[..., 0] == 0][:, 1]
    first_doc = first_doc[first_doc >= 0]
    assert first_doc.tolist() == list(range(len(first_doc)))


def test_fingerprint_depends_on_order_context_and_text():
    tok = word_tokenizer()
    docs = sample_docs()
    a = tokenize_contexts(docs, range(6), tok, context=32).fingerprint
    assert a == tokenize_contexts(docs, range(6), tok, context=32).fingerprint
    assert a != tokenize_contexts(docs, [1, 0, 2, 3, 4, 5], tok, context=32).fingerprint
    assert a != tokenize_contexts(docs, range(6), tok, context=64).fingerprint


def test_max_tokens_and_padding():
    tok = word_tokenizer()
    docs = sample_docs()
    ctx = tokenize_contexts(docs, range(len(docs)), tok, context=32, max_tokens=100)
    assert 100 <= int(ctx.attention_mask.sum()) < 100 + 32
    pad = ctx.attention_mask == 0
    assert (ctx.input_ids[pad] == tok.pad_token_id).all() and ctx.special[pad].all()


def test_corpus_readers(tmp_path):
    docs = ["first document text", "second one", "third"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert read_documents(tmp_path / "a.jsonl", field="body") == docs
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    assert read_documents(folder) == docs
    assert read_documents(folder / "1.txt") == ["second one"]
    with pytest.raises(ItdaInputError, match="no string field 'text'"):
        read_documents(tmp_path / "a.jsonl")
    with pytest.raises(ItdaInputError, match="no such corpus"):
        read_documents(tmp_path / "missing.jsonl")


def test_splits_partition_documents():
    docs = [f"document number {i}" for i in range(200)]
    train, held = split_documents(docs, "train"), split_documents(docs, "heldout")
    assert sorted(train + held) == list(range(200)) and 5 < len(held) < 40


def test_stream_matches_forward_and_drops_special():
    tok = word_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    docs = sample_docs()
    ctx = tokenize_contexts(docs, range(len(docs)), tok, context=32)
    hp = Hookpoint("resid_post", 2)
    batches = list(iterate_batches(model, [hp], ctx, batch_contexts=3, dtype=torch.float16))
    with torch.inference_mode():
        hs = model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, output_hidden_states=True).hidden_states[
            3
        ]
    want = hs[~ctx.special]
    got = torch.cat([b[hp].dense() for b in batches])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    refs = torch.cat([b[hp].refs for b in batches])
    assert (refs[:, 1] >= 0).all()


def test_fp16_overflow_is_lossless():
    x = torch.rand(50, 64, dtype=torch.float64) * 60_000 - 30_000
    x[0, 0] = 88_000.0
    assert torch.isinf(x.half()).any()
    b = to_act_batch(x.float(), torch.zeros(50, 5, dtype=torch.int64), torch.float16, "test")
    assert torch.isfinite(b.unit).all() and b.max_abs == pytest.approx(88_000.0)
    torch.testing.assert_close(b.dense().double(), x, rtol=2e-3, atol=2e-3 * 88_000)


def test_model_nan_is_reported():
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ItdaInputError, match="NaN or inf at resid_post.3"):
        to_act_batch(x, torch.zeros(3, 5, dtype=torch.int64), torch.float16, "resid_post.3")


def test_load_contexts_default_split_names():
    tok = word_tokenizer()
    with pytest.raises(ItdaInputError, match="no such corpus"):
        load_contexts("/nonexistent/corpus.jsonl", tok, tokenizer_name="w")


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two doc"]}), tmp_path / "c.parquet")
    assert read_documents(tmp_path / "c.parquet") == ["one doc", "two doc"]


def test_gguf_conversion_race_keeps_the_first_folder(tmp_path):
    """Two processes converting one GGUF file: the one that renames second finds the first's complete
    folder in place, keeps it and discards its own; a half-made target is still an error."""
    from itda.activations.models import _publish

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"first": true}')
    ours = tmp_path / ".convert-ours"
    ours.mkdir()
    (ours / "config.json").write_text('{"first": false}')
    _publish(ours, target)
    assert (target / "config.json").read_text() == '{"first": true}'
    (target / "config.json").unlink()
    (target / "other").write_text("x")
    with pytest.raises(OSError):
        _publish(ours, target)
