"""Matching-pursuit speed: itda's kernels vs the reference algorithm and the one-GEMM floor.

For each (d, N) with k = 40 and B = 4096 tokens of random data (random unit atoms: the worst
case for caches, every Gram row is touched):
  floor      one fp32 GEMM [B, d] x [d, N] (what any exact method must at least do)
  numba      itda MP, numba backend, Gram precomputed (a dictionary's Gram is computed once
             and reused for every batch; its one-off cost is reported as gram_s)
  torch      itda MP, torch backend with the same Gram
  lazy       itda MP, torch backend without a Gram (rows computed for the distinct picks per step)
  reference  the reference algorithm: k full GEMMs, a dense [B, N] coefficient matrix
The Gram budget is raised to 18 GiB (ITDA_GRAM_BUDGET) so that N = 65536 (16 GiB) uses the
Gram path on this 24 GiB machine; itda's default budget (a quarter of free memory) would pick
the lazy path there. Slow methods are timed on their first few steps and extrapolated linearly to k = 40
(setup + k x per-step), marked 'extrapolated'. Usage: python benchmarks/perf/pursuit.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import best_of, write_result

from itda.pursuit import compute_gram, matching_pursuit, orthogonal_matching_pursuit
from itda.pursuit.gram import gram_fits

K = 40
B = 4096
os.environ.setdefault("ITDA_GRAM_BUDGET", str(18 * 2**30))


def reference_mp(x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int) -> torch.Tensor:
    """The reference algorithm, re-implemented: k GEMMs and a dense coefficient matrix."""
    coef_BN = torch.zeros(x_BD.shape[0], atoms_ND.shape[0])
    r_BD = x_BD.clone()
    rows = torch.arange(x_BD.shape[0])
    for _ in range(k):
        c_BN = r_BD @ atoms_ND.T
        j = c_BN.abs().argmax(1)
        a = c_BN[rows, j]
        coef_BN[rows, j] += a
        r_BD -= a[:, None] * atoms_ND[j]
    return coef_BN @ atoms_ND


def extrapolate(fn_steps, k: int, s1: int = 1, s2: int = 3) -> float:
    """setup + k x per-step, from the best of two timings at s1 and at s2 steps."""
    t1 = best_of(lambda: fn_steps(s1), 2)
    t2 = best_of(lambda: fn_steps(s2), 2)
    per_step = max(0.0, (t2 - t1) / (s2 - s1))
    return t1 + (k - s1) * per_step


def bench_config(d: int, n: int) -> dict:
    gen = torch.Generator().manual_seed(d + n)
    atoms = torch.randn(n, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    x = torch.randn(B, d, generator=gen)
    row: dict = {"d": d, "N": n, "k": K, "B": B}
    row["floor_s"] = best_of(lambda: x @ atoms.T)
    if gram_fits(n, atoms.device):
        t0 = time.perf_counter()
        gram = compute_gram(atoms)
        row["gram_s"] = time.perf_counter() - t0
        matching_pursuit(x[:8], atoms, K, gram=gram, backend="numba")  # JIT warm-up
        row["numba_s"] = best_of(lambda: matching_pursuit(x, atoms, K, gram=gram, backend="numba"))
        row["torch_s"] = best_of(lambda: matching_pursuit(x, atoms, K, gram=gram, backend="torch"), 1)
        del gram
    else:
        row["gram_note"] = f"Gram ({4 * n * n / 2**30:.0f} GiB) exceeds the memory budget here"
    row["lazy_s"] = extrapolate(lambda s: matching_pursuit(x, atoms, s, gram=None, backend="torch"), K)
    row["lazy_extrapolated"] = True
    row["reference_s"] = extrapolate(lambda s: reference_mp(x, atoms, s), K)
    row["reference_extrapolated"] = True
    # what `auto` runs: the Gram paths when the Gram fits, the lazy path otherwise
    best = (
        min(row.get("numba_s", float("inf")), row.get("torch_s", float("inf"))) if "numba_s" in row else row["lazy_s"]
    )
    row["best_over_floor"] = best / row["floor_s"]
    row["reference_over_best"] = row["reference_s"] / best
    return row


def bench_omp(d: int = 576, n: int = 4096, b: int = 1024) -> dict:
    gen = torch.Generator().manual_seed(1)
    atoms = torch.randn(n, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    x = torch.randn(b, d, generator=gen)
    gram = compute_gram(atoms)
    orthogonal_matching_pursuit(x[:4], atoms, K, gram=gram, backend="numba")
    row = {"d": d, "N": n, "B": b, "k": K}
    row["numba_s"] = best_of(lambda: orthogonal_matching_pursuit(x, atoms, K, gram=gram, backend="numba"))
    row["torch_s"] = best_of(lambda: orthogonal_matching_pursuit(x, atoms, K, gram=gram, backend="torch"), 1)
    try:
        from sklearn.linear_model import orthogonal_mp_gram
    except ImportError:
        row["sklearn"] = "not installed"
        return row
    g64, xy = gram.numpy(), (x @ atoms.T).numpy().T
    row["sklearn_s"] = best_of(lambda: orthogonal_mp_gram(g64, xy, n_nonzero_coefs=K), 1)
    ours = orthogonal_matching_pursuit(x, atoms, K, gram=gram, backend="numba")
    theirs = orthogonal_mp_gram(g64, xy, n_nonzero_coefs=K).T
    same = [set(ours.indices[i].tolist()) == set(theirs[i].nonzero()[0].tolist()) for i in range(b)]
    row["same_support_fraction"] = sum(same) / b
    row["sklearn_over_numba"] = row["sklearn_s"] / row["numba_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only d=576, N=4096")
    parser.add_argument("--only", nargs="*", default=None, help="configs as d,N (e.g. 2048,16384)")
    args = parser.parse_args()
    grid = [(576, 4096)] if args.quick else [(d, n) for d in (576, 2048, 4096) for n in (4096, 16384, 65536)]
    if args.only:
        grid = [tuple(int(v) for v in c.split(",")) for c in args.only]
    rows = []
    for d, n in grid:
        row = bench_config(d, n)
        rows.append(row)
        print(
            f"d={d:5d} N={n:6d}  floor {row['floor_s']:7.2f}s  numba {row.get('numba_s', float('nan')):7.2f}s  "
            f"torch {row.get('torch_s', float('nan')):7.2f}s  lazy {row['lazy_s']:7.2f}s  "
            f"ref {row['reference_s']:8.2f}s  "
            f"best/floor {row['best_over_floor']:.2f}x  ref/best {row['reference_over_best']:.1f}x",
            flush=True,
        )
    omp = bench_omp() if not args.only else None
    print("OMP:", omp, flush=True)
    name = "pursuit" if not args.only else "pursuit-" + "-".join(f"{d}x{n}" for d, n in grid)
    print("wrote", write_result(name, {"mp": rows, "omp": omp}))


if __name__ == "__main__":
    main()
