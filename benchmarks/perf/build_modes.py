"""Dictionary size at equal FVU: improved vs reference build mode.

Builds both modes over a sweep of thresholds on the same stream, evaluates FVU on held-out
activations, and reads off each mode's size at the other's FVU by log-linear interpolation.
Default data: the synthetic set of the demo (d=256). --model NAME --layer L streams real
activations (default corpus, train split) instead; --acts FILE reads an activation file.
Usage: python benchmarks/perf/build_modes.py [--model smollm2-135m --layer 15 | --acts FILE] [--tokens 100000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import write_result

from itda.activations.corpus import load_contexts
from itda.activations.files import ActivationSet, load_activations
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import load_model
from itda.activations.stream import iterate_batches
from itda.builder import build_dictionary
from itda.evaluation import evaluate
from itda.synthetic import synthetic_activations

COSINES = (0.7, 0.75, 0.8, 0.85, 0.9)


def size_at_fvu(points: list[tuple[float, int]], fvu: float) -> float:
    """Interpolate log(size) linearly in FVU over (fvu, size) points; nan outside their range."""
    pts = sorted(points)
    f = np.array([p[0] for p in pts])
    s = np.log([p[1] for p in pts])
    if not (f[0] <= fvu <= f[-1]):
        return float("nan")
    return float(np.exp(np.interp(fvu, f, s)))


def model_activations(model: str, layer: int, tokens: int) -> ActivationSet:
    """Real activations (float32) and refs of one layer over the default corpus's train split."""
    lm = load_model(model)
    hp = Hookpoint("resid_post", layer)
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, tokens=tokens)
    acts, refs = [], []
    for batch in iterate_batches(lm.model, [hp], ctx):
        acts.append(batch[hp].dense())
        refs.append(batch[hp].refs)
    return ActivationSet(torch.cat(acts), torch.cat(refs), source=model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--acts", help="activation file (default: synthetic, d=256)")
    parser.add_argument("--model", help="stream activations from this model instead")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    if args.model:
        data = model_activations(args.model, args.layer, args.tokens + args.tokens // 5)
        source = f"{args.model} resid_post.{args.layer}, default corpus"
    elif args.acts:
        data = load_activations(args.acts)
        source = args.acts
    else:
        data = synthetic_activations(args.tokens + args.tokens // 5, 256, seed=0)
        source = "synthetic d=256 (itda.synthetic, seed 0)"
    train_stop = min(args.tokens, int(len(data) * 0.8))
    rows = []
    for mode in ("reference", "improved"):
        for cos in COSINES:
            d = build_dictionary(data.batches(args.batch_size, stop=train_stop), k=args.k, min_cosine=cos, mode=mode)
            rep = evaluate(d, (x for x, _ in data.batches(8192, start=train_stop)))
            rows.append({"mode": mode, "min_cosine": cos, "size": len(d), "fvu": rep.fvu, "dead_atoms": rep.dead_atoms})
            print(
                f"{mode:9s} cos {cos:.2f}: {len(d):6d} atoms, held-out FVU {rep.fvu:.4f}, dead {rep.dead_atoms}",
                flush=True,
            )
    ref_pts = [(r["fvu"], r["size"]) for r in rows if r["mode"] == "reference"]
    comparison = []
    for r in rows:
        if r["mode"] != "improved":
            continue
        ref_size = size_at_fvu(ref_pts, r["fvu"])
        comparison.append(
            {
                "fvu": r["fvu"],
                "improved_size": r["size"],
                "reference_size_at_same_fvu": ref_size,
                "ratio": r["size"] / ref_size if ref_size == ref_size else None,
            }
        )
        print(f"FVU {r['fvu']:.4f}: improved {r['size']} atoms, reference {ref_size:.0f}", flush=True)
    name = "build_modes" if not args.model else f"build_modes-{args.model}-L{args.layer}"
    print(
        "wrote",
        write_result(
            name, {"source": source, "train_tokens": train_stop, "k": args.k, "runs": rows, "equal_fvu": comparison}
        ),
    )


if __name__ == "__main__":
    main()
