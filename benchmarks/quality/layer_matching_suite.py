"""Layer-matching suite with ground truth (layer i <-> layer i): every measure, every benchmark.

Benchmarks (each a set of model pairs whose layers correspond one to one):
  seeds       small GPT-2s (8 layers, d = 128, --seed-steps steps, --seeds 4 seeds) differing only
              in seed, all pairs (trained by harness.seed_models.train_model, cached under
              $ITDA_CACHE/bench); with --first-seed F only the pairs with a seed >= F (seeds
              trained for a held-out test)
  checkpoints seed 0 after 100 / 300 steps vs the other seeds' final models (those >= F)
  smollm2     smollm2-135m (every second layer: 15) vs copies with Gaussian noise on every weight matrix
              of every block, std = level x that tensor's std, levels 0.05-0.4
  gemma3      gemma3-270m (every second layer: 9) vs its noise copies, levels 0.1-0.3
Each noise copy's next-token loss on held-out text is reported beside it (`copy_loss`): a copy
beyond the uniform distribution's loss (ln vocab) no longer computes what the base computes.
All models read the same held-out documents of the default corpus (same tokenizer within a
benchmark, so tokens pair by position); BOS dropped; the first `--rows` tokens are the sample.
Baselines see every row: linear / debiased CKA and Procrustes (exact sums), SVCCA (99%) and
relative representations (300 random anchors). ITDA measures build each layer's dictionary
(k = 40, min cosine 0.85): itda_recon_cka and itda_loss_profile over every row centred by the
sample mean, each row encoded leave-one-out (itda.comparison.itda_measures); Jaccard and the anchor
measures over the first half of the rows (the anchor measures measured on the other half):
itda_recon_cka, itda_loss_profile, itda_scaled_cka, itda_scaled_procrustes, itda_fused (with
norm_profile, its non-ITDA part) and jaccard (atom sets by token) on every layer; also what
`itda compare` falls back to past --cka-memory: cka_minibatch and itda_fused_minibatch
(minibatch CKA of the scaled reconstructions + the norm profile, hubness-corrected), 1,024 rows
per minibatch; with --full
also itda_relative, itda_code_overlap, itda_code_cosine and itda_cross_recon, on the subset of
layers in SUBSET (their pairwise MPs cost about a second per layer pair), and every measure
scored again on that subset (results[benchmark]["subset"]: fewer, farther-apart layers are an
easier task, so only measures on the same layers compare).
Reports per measure and benchmark: argmax accuracy without and with self-pairs, the specificity
margin (mean over layers of S[i, i] - max_{j != i} S[i, j], without self-pairs) and, for
itda_recon_cka and itda_fused against the best baseline, the argmax decisions only it gets right and only the
baseline gets right (McNemar counts) with the exact two-sided p-value.
Writes out/layer_matching_suite.json (merged per benchmark).
With --draws N each noise level is N copies (noise seeds 0..N-1, draw d > 0 cached as
out/suite_samples_<model>_<rows>_draw<d>.pt), each against the base: one row per level over all
of them (one noise draw decides a row by several layers; RESULTS.md).
--keep-grids writes every model pair's matrices (all measures) to out/suite_grids/ for
research/fusion_probe.py; --no-self skips the self-pairs (then no accuracy with self-pairs is reported).
Usage: python benchmarks/quality/layer_matching_suite.py [--benchmarks seeds checkpoints smollm2 gemma3] [--full]
       [--draws 1] [--first-draw 0] [--seeds 4] [--first-seed 0] [--keep-grids] [--no-self]
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
from harness.seed_models import model_dir, train_model, train_tokenizer
from harness.suite import (
    BASELINES_GOAL,
    CHECKPOINTS,
    NOISE_GEMMA3,
    NOISE_SMOLLM2,
    SEED_LAYERS,
    STRIDE,
    Prepared,
    copy_loss,
    grids,
    held_contexts,
    hits,
    keep_grids,
    margin,
    mcnemar_counts,
    noisy_copy,
    plot_table,
    samples,
)

from itda.activations.corpus import read_documents, split_documents
from itda.activations.hookpoints import n_layers
from itda.activations.models import LoadedModel, load_model
from itda.comparison.itda_measures import ITDA_MEASURES, PER_TOKEN

PLOTTED = (
    "itda_fused",
    "itda_scaled_procrustes",
    "itda_recon_cka",
    "jaccard",
    "itda_loss_profile",
    "cka",
    "cka_debiased",
    "procrustes",
    "svcca",
    "relative",
)
SUBSET = {
    "seeds": list(range(0, 8, 2)),
    "checkpoints": list(range(0, 8, 2)),
    "smollm2": list(range(0, 15, 3)),
    "gemma3": list(range(0, 9, 2)),
}  # positions (after STRIDE) that --full's costly ITDA measures are taken on


def score(per_pair: dict[tuple[str, str], np.ndarray]) -> dict:
    cross = {k: s for k, s in per_pair.items() if k[0] != k[1]}
    return {
        "without_self": float(np.mean(np.concatenate([hits(s) for s in cross.values()]))),
        "with_self": (
            float(np.mean(np.concatenate([hits(s) for s in per_pair.values()]))) if len(cross) < len(per_pair) else None
        ),
        "margin": float(np.mean([margin(s) for s in cross.values()] + [margin(s.T) for s in cross.values()])),
    }


def mcnemar(per_measure: dict, ours: str, baseline: str) -> dict:
    """Argmax decisions (without self-pairs) only `ours` gets right / only `baseline` gets right."""
    # one orientation per model pair: hits() already counts both directions, and (b, a) holds S^T
    keys = [(a, b) for a, b in per_measure[ours] if a < b]
    h_o = np.concatenate([hits(per_measure[ours][k]) for k in keys])
    h_b = np.concatenate([hits(per_measure[baseline][k]) for k in keys])
    return {"baseline": baseline, **mcnemar_counts(h_o, h_b)}


def run_pairs(models: dict[str, list[torch.Tensor]], pairs: list[tuple[str, str]], args, prepared: dict) -> dict:
    """Scores per measure over the (a, b) pairs, self-pairs added for each model."""
    per_measure: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    names = sorted({n for p in pairs for n in p})
    full = SUBSET.get(args.current) if args.full else None
    for n in names:
        if n not in prepared:
            t0 = time.perf_counter()
            prepared[n] = Prepared(models[n], args.itda_k, args.itda_cos)
            print(f"  prepared {n} ({len(models[n])} layers): {time.perf_counter() - t0:.0f}s", flush=True)
    for a, b in ([] if args.no_self else [(n, n) for n in names]) + pairs:
        t0 = time.perf_counter()
        key = ("grid", a, b)
        if key not in prepared:
            prepared[key] = grids(prepared[a], prepared[b], full, args.itda_k)
        if args.keep_grids and a != b:
            keep_grids(f"{args.row} {a} {b}", prepared[key])
        for m, s in prepared[key].items():
            per_measure.setdefault(m, {})[(a, b)] = s
            if a != b:
                per_measure[m][(b, a)] = s.T
        print(f"  {a} vs {b}: {time.perf_counter() - t0:.0f}s", flush=True)
    full_only = [m for m in per_measure if m in ITDA_MEASURES and m not in PER_TOKEN]
    every = {m: p for m, p in per_measure.items() if m not in full_only}
    scores = {m: score(p) for m, p in every.items()}
    best = max(BASELINES_GOAL, key=lambda m: scores[m]["without_self"])
    for ours in ("itda_recon_cka", "itda_fused"):
        scores[ours]["mcnemar"] = mcnemar(every, ours, best)
    if full:  # every measure on the same subset of layers
        sub = {m: {k: s[np.ix_(full, full)] for k, s in p.items()} for m, p in every.items()}
        sub.update({m: per_measure[m] for m in full_only})
        scores["subset"] = {"layers": full, **{m: score(p) for m, p in sub.items()}}
    return scores


def cached(name: str, make) -> dict:
    path = OUT / f"suite_samples_{name}.pt"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(make(), path)
    return torch.load(path)


def seed_samples(args) -> dict:
    from transformers import GPT2LMHeadModel

    docs = read_documents("default")
    train_docs = [docs[i] for i in split_documents(docs, "train")]
    tok = train_tokenizer(train_docs)
    paths = {
        f"seed{s}": train_model(
            s, tok, train_docs, args.seed_steps, layers=SEED_LAYERS, d=128, checkpoints=CHECKPOINTS if s == 0 else ()
        )
        for s in range(args.seeds)
    }
    paths.update({f"seed0@{at}": model_dir(0, args.seed_steps, SEED_LAYERS, 128, at=at) for at in CHECKPOINTS})
    lms = {n: LoadedModel(n, GPT2LMHeadModel.from_pretrained(p).eval(), tok, p) for n, p in paths.items()}
    ctx = held_contexts(next(iter(lms.values())), args.rows)
    out = {n: samples(lm, list(range(SEED_LAYERS)), ctx, args.rows) for n, lm in lms.items()}
    out["loss"] = {n: copy_loss(lm, ctx) for n, lm in lms.items()}
    return out


def noise_samples(args, model: str, levels, draw: int = 0) -> dict:
    """Every layer of the model (draw 0 only) and of its noise copies (noise seed = draw)."""
    lm = load_model(model)
    layers = list(range(n_layers(lm.model)))
    ctx = held_contexts(lm, args.rows)
    out = {"loss": {}}
    if draw == 0:
        out = {"base": samples(lm, layers, ctx, args.rows), "loss": {"base": copy_loss(lm, ctx)}}
    for level in levels:
        copy = noisy_copy(lm, level, seed=draw)
        out[str(level)], out["loss"][str(level)] = samples(copy, layers, ctx, args.rows), copy_loss(copy, ctx)
        print(f"  {model} noise {level}: copy loss {out['loss'][str(level)]:.2f} nats", flush=True)
    return out


def main() -> None:
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmarks", nargs="+", default=["seeds", "checkpoints", "smollm2", "gemma3"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--seed-steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 of the small GPT-2s")
    ap.add_argument("--first-seed", type=int, default=0, help="only the pairs with a seed >= this one (held-out seeds)")
    ap.add_argument("--itda-k", type=int, default=40)
    ap.add_argument("--itda-cos", type=float, default=0.85)
    ap.add_argument("--draws", type=int, default=1, help="noise draws per level (seeds 0..N-1), each copy vs the base")
    ap.add_argument(
        "--first-draw", type=int, default=0, help="noise seeds first-draw..first-draw+draws-1 (the base from draw 0)"
    )
    ap.add_argument("--levels", type=float, nargs="+", default=None, help="only these noise levels")
    ap.add_argument("--full", action="store_true", help="also the costly ITDA measures, on SUBSET's layers")
    ap.add_argument("--no-self", action="store_true", help="skip the self-pairs (no accuracy with self-pairs; faster)")
    ap.add_argument("--keep-grids", action="store_true", help="write every pair's matrices to out/suite_grids/")
    ap.add_argument(
        "--name", default="layer_matching_suite", help="result file out/NAME.json (merged into if it exists)"
    )
    args = ap.parse_args()
    prior = OUT / f"{args.name}.json"
    old = json.loads(prior.read_text()) if prior.exists() else {}
    results = {b: r for b, r in old.get("results", {}).items() if "cka" in r}  # drops an older layout's entries
    losses = old.get("copy_loss", {})
    finals = [f"seed{s}" for s in range(args.seeds)]
    new = [f"seed{s}" for s in range(max(1, args.first_seed), args.seeds)]
    for b in args.benchmarks:
        t0, args.current, prepared = time.perf_counter(), b, {}
        if b in ("seeds", "checkpoints"):
            acts = cached(
                f"seeds_{args.seed_steps}_{args.rows}" + (f"_n{args.seeds}" if args.seeds != 4 else ""),
                lambda: seed_samples(args),
            )
            pairs = (
                [(x, y) for x, y in itertools.combinations(finals, 2) if y in new]
                if b == "seeds"
                else [(f"seed0@{at}", f) for at in CHECKPOINTS for f in new]
            )
            args.row = b
            results[b] = run_pairs(acts, pairs, args, prepared)
            losses["seeds"] = acts["loss"]
        else:
            model, levels = {"smollm2": ("smollm2-135m", NOISE_SMOLLM2), "gemma3": ("gemma3-270m", NOISE_GEMMA3)}[b]
            ids = list(range(args.first_draw, args.first_draw + args.draws))
            draws = {
                d: cached(
                    f"{b}_{args.rows}" + (f"_draw{d}" if d else ""),
                    lambda m=model, lv=levels, d=d: noise_samples(args, m, lv, draw=d),
                )
                for d in sorted({0, *ids})
            }
            losses[b] = {
                f"{key}@draw{d}" if d else key: v
                for d, acts in draws.items()
                if d in ids
                for key, v in acts["loss"].items()
            }
            pick = slice(None, None, STRIDE[b])
            for level in [lv for lv in levels if args.levels is None or lv in args.levels]:
                models = {"base": draws[0]["base"][pick]}
                models.update({f"noisy{d}": draws[d][str(level)][pick] for d in ids})
                pairs = [("base", f"noisy{d}") for d in ids]
                args.row = f"{b} {level}"
                results[f"{b} {level}"] = run_pairs(models, pairs, args, prepared)
                for key in [k for k in prepared if "noisy" in str(k)]:
                    del prepared[key]
                print(
                    f"{b} {level}: "
                    + ", ".join(
                        f"{m} {r['without_self']:.2f}" for m, r in results[f"{b} {level}"].items() if m != "subset"
                    ),
                    flush=True,
                )
        print(f"{b}: {time.perf_counter() - t0:.0f}s", flush=True)
        write_result(
            args.name,
            {
                "settings": {k: v for k, v in vars(args).items() if k not in ("current", "row")},
                "copy_loss": losses,
                "results": results,
            },
        )
    table = {name: {m: r["without_self"] for m, r in per.items() if m != "subset"} for name, per in results.items()}
    measures = sorted({m for row in table.values() for m in row})
    print(f"{'benchmark':16s} " + " ".join(f"{m[:12]:>12s}" for m in measures))
    for name, row in table.items():
        print(f"{name:16s} " + " ".join(f"{row.get(m, float('nan')):12.2f}" for m in measures))
    means = {m: float(np.mean([row[m] for row in table.values() if m in row])) for m in measures}
    print(f"{'mean':16s} " + " ".join(f"{means[m]:12.2f}" for m in measures))
    write_result(
        args.name,
        {
            "settings": {k: v for k, v in vars(args).items() if k not in ("current", "row")},
            "copy_loss": losses,
            "results": results,
            "table": table,
            "means": means,
        },
    )
    plot_table(table, [m for m in PLOTTED if m in measures], OUT / f"{args.name}.png")


if __name__ == "__main__":
    main()
