"""Probe: candidate layer measures beyond itda.comparison's, on the suite's benchmarks (issue 9 research).

Samples are the suite's as it was then (quality/layer_matching_suite.py: same models, noise copies with
norm gains perturbed too, noisy_copy(norms=True); 3 seeds x 600 steps; held-out tokens, BOS
dropped; itda_loss_profile was not yet cross-fitted), cached in out/probe_samples_*.pt. Each layer's
ITDA dictionary is built on the first half of the rows (k = 40, min cosine 0.85) and every measure
below is taken on the other half (n rows). For tokens' unit vectors U (n x d), their MP codes C over
the layer's own atoms (n x M, atoms = rows of the first half), the reconstructions R = C A normalised:
  k_cos_cka       linear CKA of the cosine kernels (U U^T, centred): CKA in ITDA's unit geometry
  k_recon_cka     linear CKA of the ITDA reconstructions' kernels (R R^T): the layer as ITDA sees it
  k_codes_dcka    debiased CKA of the code kernels C C^T (tokens alike when they use the same atoms
                  with alike coefficients; no atom Gram: a sparse, token-set kernel)
  k_support_dcka  the same for binary supports (shared atoms counted)
  k_relown_cka    linear CKA of relative representations to the layer's own atoms (U A^T)
  transplant      A's codes carried to B: cos(B_t, sum_i c_A,ti unit(B at A's atom tokens)),
                  mean over tokens, symmetrised: is the sparse linear structure shared?
  rel_itda_mean   relative representations as Moschella et al. score them (uncentred: mean over
                  tokens of the cosine between a token's two vectors of cosines to the anchors)
                  with the union of both layers' ITDA atoms as anchors
  rel_rand_mean   the same with 300 random anchors from the first half (the anchors' effect alone)
plus the suite's baselines and ITDA measures on the same rows. Pooled argmax accuracy without
self-pairs.
Usage: python benchmarks/research/layer_matching_probe.py [--rows 4096] [--benchmarks seeds checkpoints smollm2 gemma3]

--all-layers: every layer of smollm2 (30) and gemma3 (18) at --levels, with the measures that stay
cheap at 30 x 30 pairs (CKA, Procrustes, relative, itda_relative, rel_itda_mean, and k_cos_cka /
k_recon_cka computed as linear CKA of the unit-normalised rows / of the ITDA reconstructions).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result
from harness.suite import CHECKPOINTS, NOISE_GEMMA3, NOISE_SMOLLM2, baseline_grids, held_contexts, noisy_copy, samples

from itda.activations.hookpoints import n_layers
from itda.activations.models import LoadedModel, load_model
from itda.comparison.itda_measures import layer_sample, mp_cosine, pair_similarities
from itda.comparison.layers import pooled_accuracy
from itda.comparison.measures import similarity_grid
from itda.comparison.streaming import StreamingCKAGrid
from itda.pursuit.codes import atom_totals


def _centre(k):
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def kernel_cka(ka, kb) -> float:
    a, b = _centre(ka), _centre(kb)
    return float((a * b).sum() / (a.norm() * b.norm()))


def kernel_dcka(ka, kb) -> float:
    n = ka.shape[0]

    def hsic(k, m):
        k, m = k.clone(), m.clone()
        k.fill_diagonal_(0)
        m.fill_diagonal_(0)
        ks, ms = k.sum(1), m.sum(1)
        return (
            float((k * m).sum())
            + float(ks.sum()) * float(ms.sum()) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * float(ks @ ms)
        ) / (n * (n - 3))

    den = (hsic(ka, ka) * hsic(kb, kb)) ** 0.5
    return hsic(ka, kb) / den if den > 0 else 0.0


class Layer:
    def __init__(self, x: torch.Tensor):
        self.s = layer_sample(x, k=40, min_cosine=0.85, fit=0.5)
        held = self.s.held.double()
        atoms = self.s.unit[self.s.anchors].double()
        codes, _ = mp_cosine(self.s.held, self.s.unit[self.s.anchors], 40)
        tot, used = atom_totals(codes)
        c = torch.zeros(held.shape[0], len(self.s.anchors), dtype=torch.float64)
        rows = torch.arange(held.shape[0])[:, None].expand_as(codes.indices)
        c[rows[used], codes.indices[used]] = tot[used]
        self.codes = c
        self.k_codes = c @ c.T
        b = (c != 0).double()
        self.k_support = b @ b.T
        rel = held @ atoms.T
        self.k_relown = rel @ rel.T
        self.k_cos = held @ held.T
        rec = c @ atoms
        rec = rec / rec.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.k_recon = rec @ rec.T


def transplant(a: Layer, b: Layer) -> float:
    rec = a.codes @ b.s.unit[a.s.anchors].double()
    held = b.s.held.double()
    return float(((rec * held).sum(1) / (rec.norm(dim=1) * held.norm(dim=1)).clamp(min=1e-12)).mean())


def _rel_mean(ra: torch.Tensor, rb: torch.Tensor) -> float:
    ra = ra / ra.norm(dim=1, keepdim=True).clamp(min=1e-30)
    rb = rb / rb.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return float((ra * rb).sum(1).mean())


def pair(a: Layer, b: Layer) -> dict[str, float]:
    out = {
        "k_cos_cka": kernel_cka(a.k_cos, b.k_cos),
        "k_recon_cka": kernel_cka(a.k_recon, b.k_recon),
        "k_codes_dcka": kernel_dcka(a.k_codes, b.k_codes),
        "k_support_dcka": kernel_dcka(a.k_support, b.k_support),
        "k_relown_cka": kernel_cka(a.k_relown, b.k_relown),
        "transplant": 0.5 * (transplant(a, b) + transplant(b, a)),
    }
    shared = torch.unique(torch.cat([a.s.anchors, b.s.anchors]))
    rnd = torch.randperm(a.s.n_fit, generator=torch.Generator().manual_seed(0))[:300]
    out["rel_itda_mean"] = _rel_mean(a.s.held @ a.s.unit[shared].T, b.s.held @ b.s.unit[shared].T)
    out["rel_rand_mean"] = _rel_mean(a.s.held @ a.s.unit[rnd].T, b.s.held @ b.s.unit[rnd].T)
    out.update(
        pair_similarities(a.s, b.s, 40, ("itda_relative", "itda_code_overlap", "itda_cross_recon", "itda_loss_profile"))
    )
    return out


def grids(xs, ys) -> dict[str, np.ndarray]:
    out = baseline_grids(xs, ys)
    la, lb = [Layer(x) for x in xs], [Layer(y) for y in ys]
    for i, a in enumerate(la):
        for j, b in enumerate(lb):
            for m, v in pair(a, b).items():
                out.setdefault(m, np.zeros((len(la), len(lb))))[i, j] = v
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def cheap_grids(xs, ys) -> dict[str, np.ndarray]:
    """The measures of --all-layers: feature-space forms, no n x n kernels per layer."""
    half = xs[0].shape[0] // 2
    sa = [layer_sample(x, 40, 0.85, 0.5) for x in xs]
    sb = [layer_sample(y, 40, 0.85, 0.5) for y in ys]

    def recon(s):
        codes, _ = mp_cosine(s.held, s.unit[s.anchors], 40)
        from itda.pursuit import decode

        return _unit(decode(codes, s.unit[s.anchors]))

    out = {}
    for name, fa, _fb in (
        ("cka", lambda x, s: x[half:], None),
        ("k_cos_cka", lambda x, s: s.held, None),
        ("k_recon_cka", lambda x, s: recon(s), None),
    ):
        g = StreamingCKAGrid("float64")
        g.update(
            torch.stack([fa(x, s) for x, s in zip(xs, sa, strict=True)]),
            torch.stack([fa(y, s) for y, s in zip(ys, sb, strict=True)]),
        )
        mats = g.matrices(procrustes=name == "cka")
        out[name] = mats["cka"]
        if name == "cka":
            out["procrustes"] = mats["procrustes"]
    out["relative"] = similarity_grid([x[half:] for x in xs], [y[half:] for y in ys], "relative", max_rows=half)
    for m in ("itda_relative", "rel_itda_mean"):
        out[m] = np.zeros((len(sa), len(sb)))
    for i, a in enumerate(sa):
        for j, b in enumerate(sb):
            out["itda_relative"][i, j] = pair_similarities(a, b, 40, ("itda_relative",))["itda_relative"]
            shared = torch.unique(torch.cat([a.anchors, b.anchors]))
            out["rel_itda_mean"][i, j] = _rel_mean(a.held @ a.unit[shared].T, b.held @ b.unit[shared].T)
    return out


def run(models: dict, pairs: list, grid_fn=None) -> dict[str, float]:
    per: dict = {}
    for a, b in pairs:
        t0 = time.perf_counter()
        for m, s in (grid_fn or grids)(models[a], models[b]).items():
            per.setdefault(m, {})[(a, b)] = s
        print(f"  {a} vs {b}: {time.perf_counter() - t0:.0f}s", flush=True)
    return {m: pooled_accuracy(p, self_pairs=False) for m, p in per.items()}


def cached(name: str, make):
    path = OUT / f"probe_samples_{name}.pt"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(make(), path)
    return torch.load(path)


def seed_samples(rows: int) -> dict:
    from harness.seed_models import model_dir, train_model, train_tokenizer
    from transformers import GPT2LMHeadModel

    from itda.activations.corpus import read_documents, split_documents

    docs = read_documents("default")
    train_docs = [docs[i] for i in split_documents(docs, "train")]
    tok = train_tokenizer(train_docs)
    paths = {
        f"seed{s}": train_model(s, tok, train_docs, 600, layers=8, d=128, checkpoints=CHECKPOINTS if s == 0 else ())
        for s in range(3)
    }
    paths.update({f"seed0@{at}": model_dir(0, 600, 8, 128, at=at) for at in CHECKPOINTS})
    lms = {n: LoadedModel(n, GPT2LMHeadModel.from_pretrained(p).eval(), tok, p) for n, p in paths.items()}
    ctx = held_contexts(next(iter(lms.values())), rows)
    return {n: samples(lm, list(range(8)), ctx, rows) for n, lm in lms.items()}


def noise_samples(model: str, levels, every: int, rows: int) -> dict:
    lm = load_model(model)
    layers = list(range(0, n_layers(lm.model), every))
    ctx = held_contexts(lm, rows)
    res = {"base": samples(lm, layers, ctx, rows)}
    for level in levels:
        res[str(level)] = samples(noisy_copy(lm, level, norms=True), layers, ctx, rows)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--benchmarks", nargs="+", default=["seeds", "checkpoints", "smollm2", "gemma3"])
    ap.add_argument("--all-layers", action="store_true")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.3])
    args = ap.parse_args()
    table = {}
    if args.all_layers:
        for key, model in (("smollm2", "smollm2-135m"), ("gemma3", "gemma3-270m")):
            if key in args.benchmarks:
                res = cached(
                    f"{key}_all_{args.rows}_" + "-".join(map(str, args.levels)),
                    lambda model=model: noise_samples(model, args.levels, 1, args.rows),
                )
                for level in args.levels:
                    table[f"{key} {level} all layers"] = run(
                        {"base": res["base"], "noisy": res[str(level)]}, [("base", "noisy")], cheap_grids
                    )
                    print(table[f"{key} {level} all layers"], flush=True)
        write_result("layer_matching_probe_all_layers", {"rows": args.rows, "levels": args.levels, "table": table})
        return
    if {"seeds", "checkpoints"} & set(args.benchmarks):
        seeds = cached(f"seeds_{args.rows}", lambda: seed_samples(args.rows))
        if "seeds" in args.benchmarks:
            table["seeds"] = run(seeds, list(itertools.combinations(["seed0", "seed1", "seed2"], 2)))
        if "checkpoints" in args.benchmarks:
            table["checkpoints"] = run(seeds, [(f"seed0@{at}", f"seed{s}") for at in CHECKPOINTS for s in (1, 2)])
    for key, model, levels, every in (
        ("smollm2", "smollm2-135m", NOISE_SMOLLM2, 5),
        ("gemma3", "gemma3-270m", NOISE_GEMMA3, 3),
    ):
        if key in args.benchmarks:
            res = cached(
                f"{key}_{args.rows}",
                lambda model=model, levels=levels, every=every: noise_samples(model, levels, every, args.rows),
            )
            for level in levels:
                table[f"{key} {level}"] = run({"base": res["base"], "noisy": res[str(level)]}, [("base", "noisy")])
    measures = sorted({m for r in table.values() for m in r})
    print(f"{'benchmark':14s}" + "".join(f"{m[:12]:>13s}" for m in measures))
    for b, r in table.items():
        print(f"{b:14s}" + "".join(f"{r[m]:13.2f}" for m in measures))
    means = {m: float(np.mean([r[m] for r in table.values()])) for m in measures}
    print(f"{'mean':14s}" + "".join(f"{means[m]:13.2f}" for m in measures))
    write_result("layer_matching_probe", {"rows": args.rows, "table": table, "means": means})


if __name__ == "__main__":
    main()
