"""Layer-matching suite with ground truth (layer i <-> layer i): every measure, every benchmark.

Benchmarks (each a set of model pairs whose layers correspond one to one):
  seeds       small GPT-2s (8 layers, d = 128, 600 steps) differing only in seed, all pairs
              (trained by layer_matching.py's train_model, cached under $ITDA_CACHE/bench)
  checkpoints seed 0 after 100 / 300 steps vs the other seeds' final models
  smollm2     smollm2-135m (every fifth layer: 6 layers) vs copies with Gaussian noise on every
              block weight, std = level x that tensor's std, levels 0.05-0.4
  gemma3      gemma3-270m (every third layer: 6 layers) vs its noise copies
All models read the same held-out documents of the default corpus (same tokenizer within a
benchmark, so tokens pair by position); BOS dropped; the first `--rows` tokens are the sample
every measure sees: linear / debiased CKA and Procrustes (exact, from the streaming sums of
the sample), SVCCA, relative representations, and the ITDA measures of
itda.compare.itda_measures (dictionaries built over the same sample).
Reports per measure and benchmark: argmax accuracy without and with self-pairs and the
specificity margin (mean over layers of S[i, i] - max_{j != i} S[i, j], without self-pairs).
Writes out/layer_matching_suite.json.
Usage: python benchmarks/layer_matching_suite.py [--benchmarks seeds checkpoints smollm2 gemma3] [--rows 4096]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from common import write_result
from itda.activations.corpus import load_contexts, read_documents, split_documents
from itda.activations.hookpoints import Hookpoint, n_layers
from itda.activations.models import LoadedModel, load_model
from itda.activations.stream import iterate_batches
from itda.compare.itda_measures import itda_grids
from itda.compare.layers import pooled_accuracy
from itda.compare.measures import similarity_grid
from itda.compare.streaming import StreamingCKAGrid

BASELINES = ("cka", "cka_debiased", "procrustes", "svcca", "relative")
NOISE_SMOLLM2 = (0.05, 0.1, 0.2, 0.3, 0.4)
NOISE_GEMMA3 = (0.1, 0.2, 0.3)
CHECKPOINTS = (100, 300)  # steps at which seed 0 is also saved


def noisy_copy(lm: LoadedModel, level: float, seed: int = 0) -> LoadedModel:
    """The model with N(0, (level * std(W))^2) added to every tensor of every block."""
    import copy

    model = copy.deepcopy(lm.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name or ".h." in name:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                p.add_(torch.randn(p.shape, generator=gen) * (level * std))
    return LoadedModel(f"{lm.name}+noise{level}", model, lm.tokenizer, lm.source)


def samples(lm: LoadedModel, layers: list[int], ctx, rows: int) -> list[torch.Tensor]:
    hps = [Hookpoint("resid_post", L) for L in layers]
    parts = {hp: [] for hp in hps}
    got = 0
    for batch in iterate_batches(lm.model, hps, ctx, batch_contexts=16, dtype=torch.float32):
        for hp in hps:
            parts[hp].append(batch[hp].dense())
        got += batch[hps[0]].unit.shape[0]
        if got >= rows:
            break
    return [torch.cat(parts[hp])[:rows] for hp in hps]


def baseline_grids(xs, ys) -> dict[str, np.ndarray]:
    """CKA, debiased CKA and Procrustes (exact sums), SVCCA and relative representations."""
    grid = StreamingCKAGrid("float64")
    grid.update(torch.stack(xs), torch.stack(ys))
    mats = grid.matrices(procrustes=True)
    out = {m: mats[m] for m in ("cka", "cka_debiased", "procrustes")}
    for m in ("svcca", "relative"):
        out[m] = similarity_grid(xs, ys, m, max_rows=xs[0].shape[0])
    return out


def all_grids(xs, ys, itda_k: int, itda_cos: float) -> dict[str, np.ndarray]:
    out = baseline_grids(xs, ys)
    out.update(itda_grids(xs, ys, k=itda_k, min_cosine=itda_cos))
    return out


def margin(s: np.ndarray) -> float:
    s = np.asarray(s)
    n = min(s.shape)
    vals = []
    for i in range(n):
        off = np.delete(s[i], i)
        vals.append(s[i, i] - off.max())
    return float(np.mean(vals))


def score(pairs: dict[tuple[str, str], np.ndarray]) -> dict:
    cross = [s for (a, b), s in pairs.items() if a != b]
    return {"without_self": pooled_accuracy(pairs, self_pairs=False), "with_self": pooled_accuracy(pairs, self_pairs=True),
            "margin": float(np.mean([margin(s) for s in cross]))}


def run_pairs(models: dict[str, list[torch.Tensor]], pairs: list[tuple[str, str]], args) -> dict[str, dict]:
    """Pooled scores per measure over the given (a, b) pairs (self-pairs added for each model)."""
    per_measure: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    names = sorted({n for p in pairs for n in p})
    todo = [(n, n) for n in names] + pairs
    for a, b in todo:
        t0 = time.perf_counter()
        grids = all_grids(models[a], models[b], args.itda_k, args.itda_cos)
        for m, s in grids.items():
            per_measure.setdefault(m, {})[(a, b)] = s
            if a != b:
                per_measure[m][(b, a)] = s.T
        print(f"  {a} vs {b}: {time.perf_counter() - t0:.0f}s", flush=True)
    return {m: score(p) for m, p in per_measure.items()}


def held_contexts(lm: LoadedModel, rows: int):
    return load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=rows + 512)[1]


def bench_seeds(args, checkpoints: bool) -> dict:
    from transformers import GPT2LMHeadModel

    from layer_matching import model_dir, train_model, train_tokenizer

    docs = read_documents("default")
    train_docs = [docs[i] for i in split_documents(docs, "train")]
    tok = train_tokenizer(train_docs)
    paths = {f"seed{s}": train_model(s, tok, train_docs, args.seed_steps, layers=8, d=128,
                                     checkpoints=CHECKPOINTS if s == 0 else ()) for s in range(args.seeds)}
    if checkpoints:
        paths.update({f"seed0@{at}": model_dir(0, args.seed_steps, 8, 128, at=at) for at in CHECKPOINTS})
    lms = {n: LoadedModel(n, GPT2LMHeadModel.from_pretrained(p).eval(), tok, p) for n, p in paths.items()}
    ctx = held_contexts(next(iter(lms.values())), args.rows)
    acts = {n: samples(lm, list(range(8)), ctx, args.rows) for n, lm in lms.items()}
    finals = [f"seed{s}" for s in range(args.seeds)]
    if checkpoints:
        pairs = [(f"seed0@{at}", f) for at in CHECKPOINTS for f in finals[1:]]
    else:
        pairs = list(itertools.combinations(finals, 2))
    return run_pairs(acts, pairs, args)


def bench_noise(args, model: str, levels, every: int) -> dict:
    lm = load_model(model)
    layers = list(range(0, n_layers(lm.model), every))
    ctx = held_contexts(lm, args.rows)
    out = {}
    base = samples(lm, layers, ctx, args.rows)
    for level in levels:
        noisy = samples(noisy_copy(lm, level), layers, ctx, args.rows)
        out[str(level)] = run_pairs({"base": base, "noisy": noisy}, [("base", "noisy")], args)
        print(f"{model} noise {level}: " + ", ".join(f"{m} {r['without_self']:.2f}" for m, r in out[str(level)].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmarks", nargs="+", default=["seeds", "checkpoints", "smollm2", "gemma3"])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-steps", type=int, default=600)
    ap.add_argument("--itda-k", type=int, default=40)
    ap.add_argument("--itda-cos", type=float, default=0.85)
    ap.add_argument("--smollm2-levels", type=float, nargs="+", default=list(NOISE_SMOLLM2))
    ap.add_argument("--gemma3-levels", type=float, nargs="+", default=list(NOISE_GEMMA3))
    ap.add_argument("--name", default="layer_matching_suite", help="result file out/NAME.json (merged into if it exists)")
    args = ap.parse_args()
    import json

    from common import OUT

    prior = OUT / f"{args.name}.json"
    results = json.loads(prior.read_text()).get("results", {}) if prior.exists() else {}
    for b in args.benchmarks:
        t0 = time.perf_counter()
        if b in ("seeds", "checkpoints"):
            results[b] = bench_seeds(args, checkpoints=b == "checkpoints")
        elif b == "smollm2":
            results[b] = bench_noise(args, "smollm2-135m", args.smollm2_levels, every=5)
        elif b == "gemma3":
            results[b] = bench_noise(args, "gemma3-270m", args.gemma3_levels, every=3)
        print(f"{b}: {time.perf_counter() - t0:.0f}s", flush=True)
        write_result(args.name, {"settings": vars(args), "results": results})
    table = {}
    for b, res in results.items():
        for key, per in (res.items() if b in ("smollm2", "gemma3") else [("", res)]):
            name = f"{b} {key}".strip()
            table[name] = {m: r["without_self"] for m, r in per.items()}
    measures = sorted({m for row in table.values() for m in row})
    print(f"{'benchmark':22s} " + " ".join(f"{m[:12]:>12s}" for m in measures))
    for name, row in table.items():
        print(f"{name:22s} " + " ".join(f"{row.get(m, float('nan')):12.2f}" for m in measures))
    means = {m: float(np.mean([row[m] for row in table.values() if m in row])) for m in measures}
    print(f"{'mean':22s} " + " ".join(f"{means[m]:12.2f}" for m in measures))
    write_result(args.name, {"settings": vars(args), "results": results, "table": table, "means": means})


if __name__ == "__main__":
    main()
