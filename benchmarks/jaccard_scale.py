"""Does Jaccard need paper-scale token counts? Layer matching vs tokens seen (issue 9 research).

smollm2-135m (or --model gemma3-270m) vs its noise copy (noise on weight matrices, layer_matching_suite.noisy_copy), every
second layer. Per layer one ITDA dictionary (improved mode, k = 40, --min-cosine 0.85) is built over
--tokens held-out tokens in stream order; ITDA only adds atoms, so the dictionary after the first
n tokens is the set of atoms whose source row is < n, and one build gives Jaccard (atom sets by
token) at every n. Linear CKA and Procrustes (exact streaming sums) at the same n, on the same
rows. Argmax accuracy without self-pairs, both directions.
Writes out/jaccard_scale.json (one entry per model, level, tokens).
Usage: python jaccard_scale.py [--model smollm2-135m] [--tokens 32768] [--level 0.2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from common import OUT, write_result
from itda.activations.hookpoints import n_layers
from itda.activations.models import load_model
from itda.compare.itda_measures import dictionary_rows
from itda.compare.streaming import StreamingCKAGrid
from layer_matching_suite import copy_loss, held_contexts, hits, noisy_copy, samples


def atom_rows(x_ND: torch.Tensor, min_cosine: float) -> torch.Tensor:
    return dictionary_rows(x_ND / x_ND.norm(dim=1, keepdim=True).clamp(min=1e-12), 40, min_cosine, 1024)


def jaccard_at(rows_a: list[torch.Tensor], rows_b: list[torch.Tensor], n: int) -> np.ndarray:
    sa = [set(r[r < n].tolist()) for r in rows_a]
    sb = [set(r[r < n].tolist()) for r in rows_b]
    return np.array([[len(a & b) / max(1, len(a | b)) for b in sb] for a in sa])


def accuracy(s: np.ndarray) -> float:
    return float(hits(s).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--level", type=float, default=0.2)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--min-cosine", type=float, default=0.85)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m")
    args = ap.parse_args()
    lm = load_model(args.model)
    layers = list(range(0, n_layers(lm.model), args.stride))
    ctx = held_contexts(lm, args.tokens)
    noisy = noisy_copy(lm, args.level, seed=args.noise_seed)
    t0 = time.perf_counter()
    xa, xb = samples(lm, layers, ctx, args.tokens), samples(noisy, layers, ctx, args.tokens)
    print(f"activations: {time.perf_counter() - t0:.0f}s", flush=True)
    rows_a, rows_b = [], []
    for i, (x, y) in enumerate(zip(xa, xb)):
        t0 = time.perf_counter()
        rows_a.append(atom_rows(x, args.min_cosine))
        rows_b.append(atom_rows(y, args.min_cosine))
        print(f"layer {layers[i]}: {len(rows_a[-1])} / {len(rows_b[-1])} atoms, {time.perf_counter() - t0:.0f}s", flush=True)
    out = {"model": args.model, "level": args.level, "tokens": args.tokens, "min_cosine": args.min_cosine,
           "noise_seed": args.noise_seed, "layers": layers, "copy_loss": copy_loss(noisy, ctx), "rows": {}}
    grid, seen = StreamingCKAGrid("float64"), 0
    n = 2048
    while n <= args.tokens:
        grid.update(torch.stack([x[seen:n] for x in xa]), torch.stack([y[seen:n] for y in xb]))
        seen = n
        mats = grid.matrices(procrustes=True)
        j = jaccard_at(rows_a, rows_b, n)
        out["rows"][n] = {"jaccard": accuracy(j), "cka": accuracy(mats["cka"]), "procrustes": accuracy(mats["procrustes"]),
                          "atoms_a": int(np.mean([(r < n).sum() for r in rows_a]))}
        print(n, out["rows"][n], flush=True)
        n *= 2
    path = OUT / "jaccard_scale.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[f"{args.model} {args.level} {args.tokens} {args.min_cosine} seed{args.noise_seed}"] = out
    write_result("jaccard_scale", {"runs": runs})


if __name__ == "__main__":
    main()
