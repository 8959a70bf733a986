"""Probe: what unit-normalisation throws away, and whether putting it back makes ITDA win (issue 9 research).

ITDA works on unit directions. On the suite's cached samples (out/suite_samples_*.pt, written by
quality/layer_matching_suite.py; every second layer of smollm2 / gemma3, all 8 layers of the GPT-2 seeds)
this scores, per benchmark row and noise draw, the argmax accuracy without self-pairs of:
  cka, procrustes        the raw activations (the suite's best baselines)
  unit_cka, unit_proc    the same on unit rows: the directions alone, no dictionary
  itda_recon_cka         the library's measure (centred, leave-one-out; itda.comparison.itda_measures)
  itda_loss_profile      the same
  norm_profile           Spearman correlation across tokens of the activation norms ||x_t||: the
                         one thing unit rows lose
  fused                  z(itda_recon_cka) + z(itda_loss_profile) + z(norm_profile), each matrix
                         standardised over its entries (the library's first itda_fused, replaced
                         after fusion_probe.py): chosen after looking at draw 0, so draws 1 and 2
                         are its held-out test
Writes out/norm_profile_probe.json (merged: rows of benchmarks not run are kept).
Usage: python benchmarks/research/norm_profile_probe.py [--draws 3] [--benchmarks seeds checkpoints smollm2 gemma3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result
from harness.suite import CHECKPOINTS, NOISE_GEMMA3, NOISE_SMOLLM2, SEEDS, STRIDE, cka_grid, hits

from itda.comparison.itda_measures import layer_sample
from itda.comparison.per_token import fused_grid, spearman_grid, unit_rows

MEASURES = (
    "cka",
    "procrustes",
    "unit_cka",
    "unit_proc",
    "itda_recon_cka",
    "itda_loss_profile",
    "norm_profile",
    "fused",
)


def prepare(xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One model's layers: raw rows, unit rows, norms and the ITDA per-token parts, stacked [L, ...]."""
    samples = [layer_sample(x, 40, 0.85, 0.5) for x in xs]
    return {
        "x": torch.stack([x.float() for x in xs]),
        "unit": torch.stack([unit_rows(x) for x in xs]),
        "norm": torch.stack([x.float().norm(dim=1) for x in xs]),
        "recon": torch.stack([s.recon for s in samples]),
        "loss": torch.stack([s.loss for s in samples]),
    }


def measure_grids(a: dict, b: dict) -> dict[str, np.ndarray]:
    raw, unit = cka_grid(a["x"], b["x"], procrustes=True), cka_grid(a["unit"], b["unit"], procrustes=True)
    out = {
        "cka": raw["cka"],
        "procrustes": raw["procrustes"],
        "unit_cka": unit["cka"],
        "unit_proc": unit["procrustes"],
        "itda_recon_cka": cka_grid(a["recon"], b["recon"])["cka"],
        "itda_loss_profile": spearman_grid(a["loss"], b["loss"]),
        "norm_profile": spearman_grid(a["norm"], b["norm"]),
    }
    out["fused"] = fused_grid(
        out, ("itda_recon_cka", "itda_loss_profile", "norm_profile"), hubness_k=0
    )  # the first itda_fused
    return out


def accuracy(
    models: dict[str, list[torch.Tensor]], pairs: list[tuple[str, str]], kept: dict | None = None
) -> dict[str, float]:
    """Accuracy per measure over the pairs; models named in `kept` are prepared once and kept there."""
    prepared = {}
    for n in sorted({n for p in pairs for n in p}):
        prepared[n] = kept[n] if kept is not None and n in kept else prepare(models[n])
        if kept is not None and n == "base":
            kept[n] = prepared[n]
    decisions: dict[str, list[np.ndarray]] = {m: [] for m in MEASURES}
    for a, b in pairs:
        for m, s in measure_grids(prepared[a], prepared[b]).items():
            decisions[m].append(hits(s))
    return {m: float(np.concatenate(h).mean()) for m, h in decisions.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--benchmarks", nargs="+", default=["seeds", "checkpoints", "smollm2", "gemma3"])
    args = ap.parse_args()
    prior = OUT / "norm_profile_probe.json"
    out: dict[str, dict] = json.loads(prior.read_text())["rows"] if prior.exists() else {}  # other rows kept
    for bench in args.benchmarks:
        if bench in ("seeds", "checkpoints"):
            acts = torch.load(OUT / f"suite_samples_seeds_1000_{args.rows}.pt")
            finals = [f"seed{s}" for s in range(SEEDS)]
            pairs = (
                list(itertools.combinations(finals, 2))
                if bench == "seeds"
                else [(f"seed0@{at}", f) for at in CHECKPOINTS for f in finals[1:]]
            )
            out[bench] = {"draw0": accuracy(acts, pairs)}
            print(bench, out[bench], flush=True)
            continue
        base, kept = None, {}
        for d in range(args.draws):
            acts = torch.load(OUT / (f"suite_samples_{bench}_{args.rows}" + (f"_draw{d}" if d else "") + ".pt"))
            base = acts["base"][:: STRIDE[bench]] if d == 0 else base
            for level in NOISE_SMOLLM2 if bench == "smollm2" else NOISE_GEMMA3:
                row = out.setdefault(f"{bench} {level}", {})
                row[f"draw{d}"] = accuracy(
                    {"base": base, "noisy": acts[str(level)][:: STRIDE[bench]]}, [("base", "noisy")], kept
                )
                print(bench, level, d, {m: round(v, 2) for m, v in row[f"draw{d}"].items()}, flush=True)
            del acts
        write_result("norm_profile_probe", {"draws": args.draws, "rows": out})
    write_result("norm_profile_probe", {"draws": args.draws, "rows": out})


if __name__ == "__main__":
    main()
