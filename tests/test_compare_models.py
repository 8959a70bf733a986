import json

import numpy as np
import pytest
import torch
from reference_impls import csls_loops
from tiny_models import loaded, reversed_word_tokenizer, sample_docs, word_tokenizer

from itda.activations.corpus import tokenize_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.stream import STREAM_DTYPES, iterate_batches
from itda.comparison import CompareConfig, compare_models
from itda.comparison.measures import linear_cka
from itda.comparison.report import write_matrix

# the references read the activations as the comparison streams them
STREAM = STREAM_DTYPES[CompareConfig().stream_dtype]

MEASURES = ["jaccard", "cka", "cka_debiased", "procrustes", "svcca", "relative", "mutual_knn"]


def test_self_comparison_is_perfect_on_the_diagonal():
    tok = word_tokenizer()
    lm = loaded("tiny-a", "llama", tok)
    docs = sample_docs(30, seed=1)
    res = compare_models(
        lm, None, docs, list(range(30)), tokens=2000, measures=MEASURES, context=32, k=8, max_rows=512, progress=False
    )
    assert res.identity == "token"
    for name, m in res.matrices.items():
        assert m.shape == (4, 4)
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6, err_msg=name)


def test_a_config_and_keyword_options_give_the_same_comparison():
    tok = word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok, seed=0), loaded("tiny-b", "llama", tok, seed=1)
    docs = sample_docs(10, seed=3)
    config = CompareConfig(tokens=400, measures=("cka", "svcca"), context=32, max_rows=200)
    res = compare_models(lm_a, lm_b, docs, list(range(10)), config, progress=False)
    again = compare_models(
        lm_a,
        lm_b,
        docs,
        list(range(10)),
        tokens=400,
        measures=["cka", "svcca"],
        context=32,
        max_rows=200,
        progress=False,
    )
    assert list(res.matrices) == ["cka", "svcca"] == list(again.matrices)
    for name in res.matrices:
        np.testing.assert_array_equal(res.matrices[name], again.matrices[name])
    assert [e.name for e in res.plan.estimators] == ["cka_grid", "kept_rows", "chunk_activations"]
    assert res.plan.raw_grid.exact
    assert res.notes == res.plan.notes()


def test_grid_cka_equals_pairwise_formula_across_tokenizers():
    tok_a, tok_b = word_tokenizer(), reversed_word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok_a, seed=0), loaded("tiny-b", "gpt2", tok_b, seed=1)
    docs = sample_docs(20, seed=2)
    res = compare_models(
        lm_a,
        lm_b,
        docs,
        list(range(20)),
        tokens=1500,
        measures=["cka", "jaccard"],
        context=32,
        k=8,
        batch_tokens=256,
        progress=False,
    )
    assert res.identity == "char"
    # the same tokens were read by both (same word boundaries): pair every text token
    ctx_a = tokenize_contexts(docs, range(20), tok_a, context=32, max_tokens=1500)
    assert res.paired_tokens == int((~ctx_a.special).sum())
    # recompute layer (1, 2) directly from paired activations
    ha, hb = Hookpoint("resid_post", 1), Hookpoint("resid_post", 2)
    xa = torch.cat([b[ha].dense() for b in iterate_batches(lm_a.model, [ha], ctx_a, dtype=STREAM)])
    ctx_b = tokenize_contexts(
        docs, sorted(set(ctx_a.refs[..., 0][ctx_a.refs[..., 0] >= 0].tolist())), tok_b, context=32
    )
    batches_b = list(iterate_batches(lm_b.model, [hb], ctx_b, dtype=STREAM))
    yb = torch.cat([b[hb].dense() for b in batches_b])
    rb = torch.cat([b[hb].refs for b in batches_b])
    ra = torch.cat([b[ha].refs for b in iterate_batches(lm_a.model, [ha], ctx_a, dtype=STREAM)])
    index_b = {(d, ce): i for i, (d, _p, _cs, ce, _t) in enumerate(rb.tolist())}
    rows = [index_b[(d, ce)] for d, _p, _cs, ce, _t in ra.tolist()]
    want = linear_cka(xa, yb[rows])["cka"].value
    assert abs(res.matrices["cka"][1, 2] - want) < 1e-6
    # Jaccard with character identities is defined and symmetric in shape
    assert res.matrices["jaccard_raw"].shape == (4, 4)


def test_report_files(tmp_path):
    m = np.array([[1.0, 0.2], [0.3, 0.9], [0.1, 0.8]])
    paths = write_matrix(tmp_path, "cka", m, "a", "b")
    payload = json.loads((tmp_path / "cka.json").read_text())
    assert payload["correspondence"] == [0, 1, 1] and payload["convention"] == "similarity"
    assert (tmp_path / "cka.csv").read_text().splitlines()[1].startswith("0,1.000000")
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


def test_minibatch_cka_runs_when_the_exact_accumulators_do_not_fit():
    from itda.comparison.itda_measures import ITDA_MEASURES
    from itda.comparison.minibatch import MinibatchCKAGrid

    tok = word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok, seed=0), loaded("tiny-b", "llama", tok, seed=1)
    docs = sample_docs(30, seed=4)
    res = compare_models(
        lm_a,
        lm_b,
        docs,
        list(range(30)),
        tokens=2000,
        measures=["cka", *ITDA_MEASURES],
        context=32,
        k=8,
        progress=False,
        cka_memory=1,
        cka_minibatch=256,
        max_rows=1024,
    )
    assert "cka_minibatch" in res.matrices and "cka" not in res.matrices
    assert any("minibatch" in n for n in res.notes)
    # the same estimator by hand on the paired activations (same tokenizer: tokens pair by position)
    ctx = tokenize_contexts(docs, range(30), tok, context=32, max_tokens=2000)
    hps = [Hookpoint("resid_post", i) for i in range(4)]
    xa = [
        torch.cat(t)
        for t in zip(
            *[[b[h].dense() for h in hps] for b in iterate_batches(lm_a.model, hps, ctx, dtype=STREAM)],
            strict=True,
        )
    ]
    xb = [
        torch.cat(t)
        for t in zip(
            *[[b[h].dense() for h in hps] for b in iterate_batches(lm_b.model, hps, ctx, dtype=STREAM)],
            strict=True,
        )
    ]
    grid = MinibatchCKAGrid(256)
    grid.update(xa, xb)
    np.testing.assert_allclose(res.matrices["cka_minibatch"], grid.matrix(), atol=1e-8)
    # the per-token ITDA grids past the budget: minibatch CKA too, no Procrustes (it needs the exact path)
    assert "itda_scaled_procrustes" not in res.matrices
    assert any("itda per-token CKA measures: minibatch" in n for n in res.notes)
    for m in ITDA_MEASURES:
        if m != "itda_scaled_procrustes":
            assert res.matrices[m].shape == (4, 4) and np.isfinite(res.matrices[m]).all()


def test_per_token_grids_past_the_budget_are_minibatch_cka_of_the_same_rows():
    """Past --cka-memory, itda_recon_cka / itda_scaled_cka are the minibatch estimator over the very
    rows the exact path sums (each paired token's leave-one-out reconstruction, unit and scaled by
    ||x_t - mu||), and itda_fused = csls_2(z(itda_scaled_cka) + z(norm profile))."""
    from scipy.stats import spearmanr

    from itda.comparison.minibatch import MinibatchCKAGrid
    from itda.comparison.per_token import _LayerIndex, token_parts, unit_rows

    tok = word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok, seed=0), loaded("tiny-b", "llama", tok, seed=1)
    docs = sample_docs(30, seed=4)
    measures = ["itda_recon_cka", "itda_scaled_cka", "itda_scaled_procrustes", "itda_fused"]
    res = compare_models(
        lm_a,
        lm_b,
        docs,
        list(range(30)),
        tokens=1200,
        measures=measures,
        context=32,
        k=8,
        progress=False,
        cka_memory=1,
        cka_minibatch=128,
    )
    assert sorted(res.matrices) == sorted(m for m in measures if m != "itda_scaled_procrustes")
    ctx = tokenize_contexts(docs, range(30), tok, context=32, max_tokens=1200)
    hps = [Hookpoint("resid_post", i) for i in range(4)]

    def rows(lm, basis):
        batches = list(iterate_batches(lm.model, hps, ctx, dtype=STREAM))
        refs = torch.cat([b[hps[0]].refs for b in batches])
        unit, scaled, norms = [], [], []
        for layer, hp in enumerate(hps):
            x = torch.cat([b[hp].dense() for b in batches])
            index = _LayerIndex(basis.dictionaries[layer], basis.centres_LD[layer])
            centred = x - basis.centres_LD[layer]
            r, _ = token_parts(unit_rows(centred), index.atoms, index.own(refs), 8)
            unit.append(r)
            scaled.append(r.double() * centred.norm(dim=1).double()[:, None])
            norms.append(x.norm(dim=1).numpy())
        return unit, scaled, norms

    ua, sa, na = rows(lm_a, res.per_token_basis_a)
    ub, sb, nb = rows(lm_b, res.per_token_basis_b)
    for name, xa, xb in (("itda_recon_cka", ua, ub), ("itda_scaled_cka", sa, sb)):
        grid = MinibatchCKAGrid(128)
        grid.update(xa, xb)
        np.testing.assert_allclose(res.matrices[name], grid.matrix(), atol=1e-6)
    norm = np.array([[spearmanr(p, q).statistic for q in nb] for p in na])
    parts = [res.matrices["itda_scaled_cka"], norm]
    np.testing.assert_allclose(
        res.matrices["itda_fused"], csls_loops(sum((s - s.mean()) / s.std() for s in parts), 2), atol=1e-5
    )


def test_per_token_itda_measures_stream_every_token_leave_one_out():
    """itda_loss_profile / itda_recon_cka over the whole stream: every paired token of each layer,
    centred by the layer's mean over the first document chunk, encoded by MP over that layer's
    dictionary of centred rows without its own atom, checked in float64 here."""
    from reference_impls import mp_float64
    from scipy.stats import spearmanr

    tok = word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok, seed=0), loaded("tiny-b", "llama", tok, seed=1)
    docs = sample_docs(12, seed=4)
    k, context, batch_tokens = 6, 32, 128
    res = compare_models(
        lm_a,
        lm_b,
        docs,
        list(range(12)),
        tokens=600,
        context=context,
        k=k,
        batch_tokens=batch_tokens,
        measures=["itda_loss_profile", "itda_recon_cka", "itda_scaled_cka", "itda_scaled_procrustes", "itda_fused"],
        max_rows=16,
        progress=False,
    )
    assert "jaccard_raw" not in res.matrices and not res.dictionaries_a  # no Jaccard dictionaries were asked for
    ctx = tokenize_contexts(docs, range(12), tok, context=context, max_tokens=600)
    n_tokens = int((~ctx.special).sum())
    assert n_tokens > 16  # more tokens than --max-rows: the measures are not sample-based
    # the first document chunk: batch_tokens // context contexts, extended to the end of its document
    row_doc = ctx.refs[..., 0].max(dim=1).values
    end = batch_tokens // context
    while end < len(row_doc) and row_doc[end] == row_doc[end - 1]:
        end += 1

    def side(lm, basis, layer):
        hp = Hookpoint("resid_post", layer)
        batches = list(iterate_batches(lm.model, [hp], ctx, dtype=STREAM))
        x = torch.cat([b[hp].dense() for b in batches]).double().numpy()
        refs = torch.cat([b[hp].refs for b in batches]).numpy()
        first = np.isin(refs[:, 0], np.unique(row_doc[:end].numpy()))
        np.testing.assert_allclose(basis.centres_LD[layer].numpy(), x[first].mean(0), rtol=1e-5, atol=1e-5)
        x = x - x[first].mean(0)
        length = np.linalg.norm(x, axis=1)
        x /= length[:, None]
        atoms = basis.dictionaries[layer].atoms.double().numpy()
        row_of = {(int(d), int(p)): r for r, (d, p) in enumerate(refs[:, :2].tolist())}
        own = {(int(d), int(p)): i for i, (d, p) in enumerate(basis.dictionaries[layer].refs[:, :2].tolist())}
        # every atom is its token's centred row
        np.testing.assert_allclose(atoms, x[[row_of[key] for key in own]], atol=1e-4)
        q, cos = np.zeros_like(x), np.zeros(len(x))
        for r in range(len(x)):
            keep = np.array([i for i in range(len(atoms)) if i != own.get((int(refs[r, 0]), int(refs[r, 1])), -1)])
            idx, val, _, _ = mp_float64(x[r : r + 1], atoms[keep], min(k, len(atoms)))
            q[r] = val[0] @ atoms[keep][idx[0]]
            cos[r] = q[r] @ x[r] / np.linalg.norm(q[r])
        assert len(x) == n_tokens and len(own) < len(x)
        return q / np.linalg.norm(q, axis=1, keepdims=True), cos, length

    def cka_procrustes(p, q):  # float64, centred
        p, q = p - p.mean(0), q - q.mean(0)
        cka = np.linalg.norm(p.T @ q) ** 2 / (np.linalg.norm(p.T @ p) * np.linalg.norm(q.T @ q))
        return cka, np.linalg.svd(p.T @ q, compute_uv=False).sum() / (np.linalg.norm(p) * np.linalg.norm(q))

    for la, lb in ((1, 1), (2, 3)):
        qa, ca, na = side(lm_a, res.per_token_basis_a, la)
        qb, cb, nb = side(lm_b, res.per_token_basis_b, lb)
        assert abs(res.matrices["itda_loss_profile"][la, lb] - spearmanr(ca, cb).statistic) < 2e-3
        assert abs(res.matrices["itda_recon_cka"][la, lb] - cka_procrustes(qa, qb)[0]) < 2e-3
        # the reconstructions at their centred rows' lengths
        cka, proc = cka_procrustes(qa * na[:, None], qb * nb[:, None])
        assert abs(res.matrices["itda_scaled_cka"][la, lb] - cka) < 2e-3
        assert abs(res.matrices["itda_scaled_procrustes"][la, lb] - proc) < 2e-3

    # itda_fused: its two scaled ITDA parts and the norm profile (Spearman of every token's activation
    # norm), each matrix standardised over its entries, summed, hubness-corrected (CSLS, k = 2)
    def norms(lm):
        hps = [Hookpoint("resid_post", layer) for layer in range(res.matrices["itda_fused"].shape[0])]
        batches = list(iterate_batches(lm.model, hps, ctx, dtype=STREAM))
        return [torch.cat([b[hp].dense() for b in batches]).norm(dim=1).numpy() for hp in hps]

    norm = np.array([[spearmanr(p, q).statistic for q in norms(lm_b)] for p in norms(lm_a)])
    parts = [res.matrices["itda_scaled_cka"], res.matrices["itda_scaled_procrustes"], norm]
    np.testing.assert_allclose(
        res.matrices["itda_fused"], csls_loops(sum((s - s.mean()) / s.std() for s in parts), 2), atol=1e-5
    )


def test_pass_two_in_pieces_gives_the_bits_of_whole_chunks(monkeypatch):
    """Pass 2 encodes PASS2_ROWS paired tokens at a time; the exact and the minibatch grids see the
    same slices and minibatches as with whole chunks, so every matrix is bit-identical."""
    import itda.comparison.passes as passes
    from itda.comparison.itda_measures import PER_TOKEN as per_token

    tok = word_tokenizer()
    lm_a, lm_b = loaded("tiny-a", "llama", tok, seed=0), loaded("tiny-b", "llama", tok, seed=1)
    docs = sample_docs(30, seed=6)

    def run(pass2_rows, **options):
        monkeypatch.setattr(passes, "PASS2_ROWS", pass2_rows)
        kw = dict(tokens=2500, measures=["cka", *per_token], context=32, k=8, batch_tokens=2048, progress=False)
        return compare_models(lm_a, lm_b, docs, list(range(30)), **{**kw, **options}).matrices

    for options in ({}, {"cka_memory": 1, "cka_minibatch": 256}):
        whole, pieces = run(1 << 20, **options), run(512, **options)
        assert sorted(whole) == sorted(pieces)
        for name in whole:
            np.testing.assert_array_equal(pieces[name], whole[name], err_msg=f"{name} {options}")


def test_stream_dtype_is_checked_and_float32_streams_dense_rows():
    from itda.configfields import FieldError

    with pytest.raises(FieldError, match="stream_dtype"):
        CompareConfig(stream_dtype="int8")
    tok = word_tokenizer()
    lm = loaded("tiny-a", "llama", tok, seed=0)
    docs = sample_docs(20, seed=3)
    kw = dict(tokens=1200, measures=["cka"], context=32, progress=False)
    f16 = compare_models(lm, loaded("tiny-b", "llama", tok, seed=1), docs, list(range(20)), **kw).matrices["cka"]
    f32 = compare_models(
        lm, loaded("tiny-b", "llama", tok, seed=1), docs, list(range(20)), stream_dtype="float32", **kw
    ).matrices["cka"]
    # float16 unit rows move CKA by their rounding only (~1e-4 relative), and they do move it
    np.testing.assert_allclose(f16, f32, atol=1e-3)
    assert not np.array_equal(f16, f32)


def test_kept_rows_of_a_self_comparison_are_held_once_and_gathered_once():
    """B's kept rows are A's (one copy) in a self-comparison, before and after a (one-rank) gather."""
    from itda.activations.stream import to_act_batch
    from itda.comparison.passes import KeptRows

    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    refs = torch.zeros(10, 5, dtype=torch.int64)
    batch = [to_act_batch(x[i], refs, torch.float16, f"layer {i}") for i in range(2)]
    rows = torch.arange(10)

    class OneRank:  # gather_kept as ranks.Ranks does it with a single rank: the pieces in order
        distributed = True

        def gather_kept(self, kept, chunk, max_rows, d, order=None):
            calls.append(d)
            return [[torch.cat(s)[:max_rows]] for s in kept], torch.arange(max_rows)

    calls: list[int] = []
    for self_compare in (True, False):
        kept = KeptRows(2, 2, 6, self_compare)
        kept.add(0, batch, rows[:4], batch, rows[:4])
        kept.add(1, batch, rows[4:], batch, rows[4:])
        assert kept.n == 6 and (kept.b is kept.a) == self_compare
        before = [t.clone() for t in kept.layers()[0]]
        kept.gather(OneRank(), 8, 8)  # type: ignore[arg-type]
        xs, ys = kept.layers()
        assert (kept.b is kept.a) == self_compare
        for layer in range(2):
            assert torch.equal(xs[layer], before[layer]) and torch.equal(ys[layer], before[layer])
            assert torch.equal(xs[layer], batch[layer].dense()[:6])
    assert calls == [8, 8, 8]  # one gather in the self-comparison, two otherwise
