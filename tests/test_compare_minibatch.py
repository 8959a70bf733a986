"""Minibatch CKA against an independent float64 loop over minibatches (unbiased HSIC by formula)."""

import numpy as np
import torch

from itda.compare.minibatch import MinibatchCKAGrid, exact_grid_bytes


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def test_matches_formula_and_streams_in_any_chunks():
    g = np.random.default_rng(0)
    n, m = 96, 32
    xs = [g.standard_normal((n, 7)) for _ in range(3)]
    ys = [xs[0] @ g.standard_normal((7, 5)) + 0.1 * g.standard_normal((n, 5)), g.standard_normal((n, 4))]
    grid = MinibatchCKAGrid(m)
    for s, e in ((0, 10), (10, 50), (50, 96)):  # chunks that do not align with the minibatches
        grid.update([torch.tensor(x[s:e]) for x in xs], [torch.tensor(y[s:e]) for y in ys])
    got = grid.matrix()
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            num = den_a = den_b = 0.0
            for b in range(n // m):
                xb, yb = x[b * m : (b + 1) * m], y[b * m : (b + 1) * m]
                k, l = xb @ xb.T, yb @ yb.T
                num += hsic1(k, l)
                den_a += hsic1(k, k)
                den_b += hsic1(l, l)
            assert abs(got[i, j] - num / np.sqrt(den_a * den_b)) < 1e-10
    assert got[0, 0] > 0.5 and abs(got[1, 1]) < 0.3  # a projection of x0 vs unrelated data


def test_independent_data_is_near_zero_where_biased_cka_is_not():
    g = np.random.default_rng(1)
    x, y = g.standard_normal((1024, 512)), g.standard_normal((1024, 512))
    grid = MinibatchCKAGrid(256)
    grid.update([torch.tensor(x)], [torch.tensor(y)])
    assert abs(grid.matrix()[0, 0]) < 0.05


def test_memory_is_independent_of_width():
    small = MinibatchCKAGrid.memory_bytes(80, 80, 512)
    assert small < 2**30  # 80 x 80 layer pairs of any width
    assert exact_grid_bytes(80, 8192, 80, 8192) > 2**40  # the exact accumulators: terabytes
