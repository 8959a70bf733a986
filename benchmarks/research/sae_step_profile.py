"""Probe: where one SAE training step's time goes (issue 21, 2026-12-02).

A TopK SAE of `--latents` latents on d = `--d` Gaussian rows, batches of `--batch`, kaiming init, itda's
default TrainConfig: three warm-up steps, then `--steps` steps under cProfile; prints the seconds per
step and the top functions by own time. The RESULTS.md figures (0.127 s a step before the sparse encoder
backward, 0.074 s after; the backward's and the forward GEMM's shares) are this probe at its defaults.
Usage: python benchmarks/research/sae_step_profile.py [--d 576] [--latents 4608] [--k 32] [--batch 1024]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from itda.sae import SaeConfig, SaeTrainer, TrainConfig, new_sae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--latents", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=17)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn((args.steps + 3) * args.batch, args.d)
    sae, _ = new_sae(SaeConfig(args.d, args.latents, args.k), "kaiming", x[:4096], seed=0)
    trainer = SaeTrainer(sae, TrainConfig(steps=args.steps + 3))
    batches = x.split(args.batch)
    for b in batches[:3]:
        trainer.step(b)
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    for b in batches[3:]:
        trainer.step(b)
    profile.disable()
    print(f"{(time.perf_counter() - t0) / args.steps:.4f} s a step")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
