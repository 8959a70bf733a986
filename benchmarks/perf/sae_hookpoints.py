"""Several hookpoints' SAEs from one forward pass against one run per hookpoint (issue 21, 2026-12-02).

smollm2-135m, --layers (resid_post) on the default corpus's train split: `itda.train_saes` (one
forward pass per batch feeds every SAE) against `itda.train_sae` once per layer (each run forwards
the model up to its layer), same SAE settings and steps. Reports both wall times, their ratio, and
whether the SAEs are bit-identical (they are the same batches). One process each, this machine.
Usage: python benchmarks/perf/sae_hookpoints.py [--layers 4 8 15] [--steps 20] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import machine, write_result

import itda


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 15])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--latents", type=int, default=4608)
    args = ap.parse_args()
    opts = dict(latents=args.latents, k=32, steps=args.steps, batch_size=args.batch_size, init="kaiming", seed=0)
    lm = itda.load_model("smollm2-135m", device="cpu")
    t0 = time.perf_counter()
    together = itda.train_saes(lm, args.layers, progress=False, **opts)
    t_together = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = {
        f"resid_post.{layer}": itda.train_sae(model=lm, layer=layer, progress=False, **opts) for layer in args.layers
    }
    t_alone = time.perf_counter() - t0
    same = all(
        torch.equal(getattr(together[h].sae, n), getattr(alone[h].sae, n))
        for h in alone
        for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    tokens = args.steps * args.batch_size
    print(
        f"layers {args.layers}, {tokens} tokens each: one forward {t_together:.1f} s, one run per layer "
        f"{t_alone:.1f} s ({t_alone / t_together:.2f}x); SAEs bit-identical: {same}"
    )
    write_result(
        "sae_hookpoints",
        {
            "machine": machine(),
            **vars(args),
            "together_s": t_together,
            "alone_s": t_alone,
            "ratio": t_alone / t_together,
            "identical": same,
        },
    )


if __name__ == "__main__":
    main()
