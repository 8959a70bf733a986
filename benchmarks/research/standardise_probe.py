"""Probe: centring or per-dimension standardisation before every measure (issue 9 research).

On the suite's cached samples (out/suite_samples_*.pt, written by quality/layer_matching_suite.py),
every second layer: each dimension centred (and, standardised, scaled by its std) over the
dictionary half, then
the suite's measures (layer_matching_suite.grids: ITDA measures and baselines alike) on the
transformed rows, base vs noise copy. Accuracy without self-pairs, both directions, plain vs
centred vs standardised (CKA and Procrustes centre anyway: centring changes only ITDA's input).
Writes out/standardise_probe.json.
Since the per-token measures (itda_recon_cka, itda_loss_profile) centre by themselves, their plain
and centred columns coincide; the RESULTS.md tables of this probe were measured before, at
commit c866b8f.
Usage: python benchmarks/research/standardise_probe.py [--rows 4096] [--models smollm2 gemma3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result
from harness.suite import NOISE_GEMMA3, NOISE_SMOLLM2, STRIDE, Prepared, grids, hits

MEASURES = ("itda_recon_cka", "itda_loss_profile", "jaccard", "cka", "procrustes")


def centre(x_ND: torch.Tensor) -> torch.Tensor:
    return x_ND - x_ND[: x_ND.shape[0] // 2].mean(0)


def standardise(x_ND: torch.Tensor) -> torch.Tensor:
    half = x_ND[: x_ND.shape[0] // 2]
    return (x_ND - half.mean(0)) / half.std(0).clamp(min=1e-6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    args = ap.parse_args()
    prior = OUT / "standardise_probe.json"
    out = json.loads(prior.read_text()) if prior.exists() else {}  # rows of other models are kept
    for key, levels in (("smollm2", NOISE_SMOLLM2[2:4]), ("gemma3", NOISE_GEMMA3)):
        if key not in args.models:
            continue
        acts = torch.load(OUT / f"suite_samples_{key}_{args.rows}.pt")
        base = acts["base"][:: STRIDE[key]]
        for level in levels:
            noisy = acts[str(level)][:: STRIDE[key]]
            row = {}
            for tag, f in (("plain", lambda x: x), ("centred", centre), ("standardised", standardise)):
                pa, pb = Prepared([f(x) for x in base], 40, 0.85), Prepared([f(y) for y in noisy], 40, 0.85)
                mats = grids(pa, pb, None, 40)
                row[tag] = {m: float(hits(mats[m]).mean()) for m in MEASURES}
                row[tag]["atoms_per_layer"] = float(pa.atoms.sum(1).mean())
            out[f"{key} {level}"] = row
            print(key, level, row, flush=True)
            write_result("standardise_probe", out)


if __name__ == "__main__":
    main()
