"""Data selection: the coverage strategies against plain re-implementations, and `itda select` end to end."""

import itertools
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from tiny_models import saved_model_and_corpus
from typer.testing import CliRunner

from itda.cli.main import app
from itda.selection.coverage import coverage_curve, greedy_max_coverage, simscale
from itda.selection.supports import document_supports

runner = CliRunner()


def _random_sets(n_docs, n_atoms, seed, density=0.08):
    g = np.random.default_rng(seed)
    m = (g.random((n_docs, n_atoms)) < g.uniform(0.2, 2.0, (n_docs, 1)) * density).astype(np.float32)
    return sp.csr_matrix(m), m.astype(bool)


def _plain_greedy(m: np.ndarray, budget: int):
    """Textbook greedy max-coverage: recompute every gain at every step; ties to the lower index."""
    covered = np.zeros(m.shape[1], bool)
    chosen, gains = [], []
    for _ in range(budget):
        g = (m & ~covered).sum(1)
        g[chosen] = -1
        d = int(np.argmax(g))
        chosen.append(d)
        gains.append(int(g[d]))
        covered |= m[d]
    return chosen, gains


@pytest.mark.parametrize("seed", range(5))
def test_lazy_greedy_equals_the_textbook_greedy(seed):
    sets, m = _random_sets(60, 90, seed)
    chosen, gains = greedy_max_coverage(sets, 15)
    want_c, want_g = _plain_greedy(m, 15)
    assert chosen.tolist() == want_c and gains.tolist() == want_g
    np.testing.assert_array_equal(coverage_curve(sets, chosen), np.cumsum(want_g))


def test_greedy_is_within_one_minus_one_over_e_of_the_best_subset():
    sets, m = _random_sets(12, 40, 3, density=0.15)
    best = max(np.any(m[list(c)], axis=0).sum() for c in itertools.combinations(range(12), 3))
    got = coverage_curve(sets, greedy_max_coverage(sets, 3)[0])[-1]
    assert got >= (1 - 1 / np.e) * best and got <= best


def test_simscale_accepts_by_the_published_rule():
    sets, m = _random_sets(50, 60, 8, density=0.2)
    chosen, taus = simscale(sets, 20, tau0=0.2, step=0.1)
    # independent: complexity order, accept under tau while below the budget, then raise tau
    size = m.sum(1)
    order = [d for d in sorted(range(50), key=lambda d: (-size[d], d)) if size[d] > 0]
    want, want_tau, tau = [], [], 0.2
    while len(want) < 20:
        for d in order:
            if len(want) < 20 and d not in want:
                cos = [(m[d] & m[e]).sum() / np.sqrt(size[d] * size[e]) for e in want]
                if not cos or max(cos) <= tau + 1e-12:
                    want.append(d)
                    want_tau.append(round(tau, 6))
        tau += 0.1
    assert chosen.tolist() == want
    np.testing.assert_allclose(taus, want_tau)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    model, corpus, _docs = saved_model_and_corpus(root, 60, seed=11)
    r = runner.invoke(
        app,
        [
            "build",
            str(model),
            "--layer",
            "2",
            "--corpus",
            str(corpus),
            "--tokens",
            "3000",
            "--context",
            "32",
            "--k",
            "8",
            "--out",
            str(root / "d"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    return {"root": root, "model": model, "corpus": corpus, "dict": root / "d" / "resid_post.2.safetensors"}


def _select(setup, out, *extra):
    return runner.invoke(
        app,
        [
            "select",
            str(setup["corpus"]),
            "--dict",
            str(setup["dict"]),
            "--budget",
            "8",
            "--context",
            "32",
            "--out",
            str(out),
            "-q",
            *extra,
        ],
    )


def test_select_end_to_end(setup):
    from itda.activations.corpus import read_documents
    from itda.activations.hookpoints import parse_hookpoint
    from itda.activations.models import load_model
    from itda.dictionary import Dictionary

    out = setup["root"] / "subset.jsonl"
    r = _select(setup, out)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert len(lines) == 8 and len({x["doc"] for x in lines}) == 8
    docs = read_documents(str(setup["corpus"]))
    assert all(x["text"] == docs[x["doc"]] for x in lines)
    # the supports by hand: all documents in one pass, each token's MP code, its 4 strongest atoms by a plain loop
    from itda.activations.corpus import tokenize_contexts
    from itda.activations.stream import iterate_batches
    from itda.pursuit import matching_pursuit

    d = Dictionary.load(setup["dict"])
    lm = load_model(str(setup["model"]))
    hp = parse_hookpoint(d.meta.hookpoint)
    ctx = tokenize_contexts(docs, range(len(docs)), lm.tokenizer, context=32)
    sets = [set() for _ in docs]
    for batch in iterate_batches(lm.model, [hp], ctx, batch_contexts=len(ctx), dtype=torch.float32):
        codes = matching_pursuit(batch[hp].dense(), d.atoms.float(), d.meta.k)
        for doc, idx, val in zip(
            batch[hp].refs[:, 0].tolist(), codes.indices.tolist(), codes.values.tolist(), strict=True
        ):
            total = {}
            for i, v in zip(idx, val, strict=True):
                total[i] = total.get(i, 0.0) + v
            sets[doc] |= set(sorted((i for i in total if total[i] != 0), key=lambda i: -abs(total[i]))[:4])
    mine = document_supports(lm, d, hp, docs, list(range(len(docs))), k=d.meta.k, context=32, progress=False)
    assert [set(np.nonzero(mine.sets[i].toarray()[0])[0].tolist()) for i in range(len(docs))] == sets
    sup = sp.csr_matrix(np.array([[a in s for a in range(len(d))] for s in sets], dtype=np.float32))
    chosen, gains = greedy_max_coverage(sup, 8)
    assert [x["doc"] for x in lines] == chosen.tolist() and [x["new_atoms"] for x in lines] == gains.tolist()
    cov = report["coverage"]
    assert cov["greedy"]["atoms"] == gains.sum()
    assert cov["greedy"]["atoms"] >= cov["random"]["atoms"] and cov["greedy"]["atoms"] >= cov["longest"]["atoms"]
    assert report["atoms_used_by_corpus"] == len(set().union(*sets))
    assert out.with_suffix(".coverage.png").stat().st_size > 1000
    # deterministic, and an earlier selection may be replaced
    first = out.read_bytes()
    assert _select(setup, out).exit_code == 0 and out.read_bytes() == first


@pytest.mark.parametrize("strategy", ["simscale", "complexity", "random", "longest"])
def test_select_strategies_run(setup, strategy):
    out = setup["root"] / f"{strategy}.jsonl"
    r = _select(setup, out, "--strategy", strategy)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    coverage = json.loads(out.with_suffix(".report.json").read_text())["coverage"]
    assert len(lines) == 8 and all(isinstance(x["new_atoms"], int) for x in lines)
    assert sum(x["new_atoms"] for x in lines) == coverage[strategy]["atoms"]  # the chosen documents' own gains


def test_select_bad_inputs(setup, tmp_path):
    corpus_bytes = setup["corpus"].read_bytes()
    r = runner.invoke(
        app,
        ["select", str(setup["corpus"]), "--dict", str(setup["dict"]), "--budget", "3", "--out", str(setup["corpus"])],
    )
    assert r.exit_code == 2 and "also an input" in r.output and setup["corpus"].read_bytes() == corpus_bytes
    foreign = tmp_path / "keep.jsonl"
    foreign.write_text("mine\n")
    r = _select(setup, foreign)
    assert r.exit_code == 2 and "exists and is not a select subset" in r.output and foreign.read_text() == "mine\n"
    for args, msg in (
        (["--budget", "0"], "--budget"),
        (["--strategy", "best"], "--strategy"),
        (["--budget", "100000"], "exceeds"),
    ):
        r = runner.invoke(
            app,
            [
                "select",
                str(setup["corpus"]),
                "--dict",
                str(setup["dict"]),
                "--context",
                "32",
                "--out",
                str(tmp_path / "x.jsonl"),
                "-q",
                *args,
            ]
            + ([] if "--budget" in args else ["--budget", "3"]),
        )
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x.jsonl").exists()


def test_strongest_atoms_by_total_coefficient():
    from itda.pursuit.codes import SparseCodes
    from itda.selection.supports import strongest_atoms

    idx = torch.tensor([[3, 1, 3, 2, 0], [4, 4, 1, 2, -1]])
    val = torch.tensor([[0.5, -0.9, 0.6, 0.1, 0.0], [1.0, -1.0, 0.2, -0.3, 0.0]])
    rows, slots = strongest_atoms(SparseCodes(idx, val, torch.zeros(2)), 2)
    got = sorted((int(r), int(idx[r, s])) for r, s in zip(rows, slots, strict=True))
    # row 0: atom 3 totals 1.1, atom 1 |-0.9|; row 1: atom 4 cancels to 0 (not used), then |-0.3| (2), 0.2 (1)
    assert got == [(0, 1), (0, 3), (1, 1), (1, 2)]
