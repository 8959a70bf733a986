"""Comparison memory: all layer pairs of two large models within a fixed host-memory budget.

1. Synthetic: two 80-layer d = 8192 "models" (Gaussian activations, layer j of B a noisy
   rotation-free copy of layer j of A), `--minibatches` minibatches of `--m` paired tokens
   through MinibatchCKAGrid, in a child process; peak RssAnon and VmHWM. The exact streaming
   accumulators would need exact_grid_bytes(80, 8192, 80, 8192) (printed).
2. smollm2-135m against itself, all 30 x 30 layer pairs, `itda compare ... --measures cka
   --tokens 16000` in a child process (minibatch CKA: the exact accumulators exceed the
   default --cka-memory of 1 GiB); peak RssAnon and VmHWM.
Writes out/compare_memory.json. Usage: python benchmarks/perf/compare_memory.py [--m 512] [--minibatches 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import run_measured, write_result

from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes


def child(layers: int, d: int, m: int, minibatches: int) -> None:
    grid = MinibatchCKAGrid(m)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(minibatches):
        xs = [torch.randn(m, d, generator=gen) for _ in range(layers)]
        ys = [x + 0.5 * torch.randn(m, d, generator=gen) for x in xs]
        grid.update(xs, ys)
        del xs, ys
    s = grid.matrix()
    diag = float(s.diagonal().mean())
    off = float((s.sum() - s.diagonal().sum()) / (s.size - len(s)))
    print(f"{time.perf_counter() - t0:.1f} {diag:.4f} {off:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.layers, args.d, args.m, args.minibatches)
        return
    res = run_measured(
        [
            sys.executable,
            __file__,
            "--child",
            "--layers",
            str(args.layers),
            "--d",
            str(args.d),
            "--m",
            str(args.m),
            "--minibatches",
            str(args.minibatches),
        ]
    )
    secs, diag, off = res["stdout"].split()[-3:]
    out = {
        "synthetic": {
            "layers": args.layers,
            "d": args.d,
            "minibatch": args.m,
            "minibatches": args.minibatches,
            "seconds": float(secs),
            "mean_diagonal_cka": float(diag),
            "mean_off_diagonal_cka": float(off),
            "peak_rss_anon_GiB": res["peak_rss_anon"] / 2**30,
            "vmhwm_GiB": res["vmhwm"] / 2**30,
            "exact_accumulators_GiB": exact_grid_bytes(args.layers, args.d, args.layers, args.d) / 2**30,
        }
    }
    print(out, flush=True)
    if not args.skip_smollm2:
        res = run_measured(
            [
                sys.executable,
                "-m",
                "itda",
                "compare",
                "smollm2-135m",
                "smollm2-135m",
                "--measures",
                "cka",
                "--tokens",
                "16000",
                "-q",
            ]
        )
        out["smollm2_30x30"] = {
            "peak_rss_anon_GiB": res["peak_rss_anon"] / 2**30,
            "vmhwm_GiB": res["vmhwm"] / 2**30,
            "seconds": res["seconds"],
            "returncode": res["returncode"],
            "output": res["stdout"].strip().splitlines()[:3],
            "exact_accumulators_GiB": exact_grid_bytes(30, 576, 30, 576) / 2**30,
        }
        print(out["smollm2_30x30"], flush=True)
    print("wrote", write_result("compare_memory", out))


if __name__ == "__main__":
    main()
