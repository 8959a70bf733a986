"""Minibatch CKA against an independent float64 loop over minibatches (unbiased HSIC by formula)."""

import numpy as np
import torch

from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes


def hsic1(ka: np.ndarray, kb: np.ndarray) -> float:
    n = ka.shape[0]
    at, bt = ka.copy(), kb.copy()
    np.fill_diagonal(at, 0)
    np.fill_diagonal(bt, 0)
    one = np.ones(n)
    return (
        np.trace(at @ bt)
        + (one @ at @ one) * (one @ bt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * one @ at @ bt @ one
    ) / (n * (n - 3))


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
                ka, kb = xb @ xb.T, yb @ yb.T
                num += hsic1(ka, kb)
                den_a += hsic1(ka, ka)
                den_b += hsic1(kb, kb)
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


class _TwoRanks:
    """Stands in for a 2-rank Exchange: sum_ adds the other rank's tensor of the same call."""

    def __init__(self):
        self.calls = []

    def sum_(self, t):
        self.calls.append(t.clone())
        return t


def _summed(grid_a, grid_b, call):
    """grid_a.sum_over(...) with grid_b's contributions, recorded by running grid_b's sum_over first."""
    rec = _TwoRanks()
    call(grid_b, rec)
    peer = iter(rec.calls)

    class Peer:
        @staticmethod
        def sum_(t):
            t += next(peer)
            return t

    call(grid_a, Peer)


def test_sums_of_two_ranks_add_up_to_one_pass_over_both():
    from itda.comparison.streaming import StreamingCKAGrid

    g = np.random.default_rng(3)
    xs = torch.tensor(g.standard_normal((2, 128, 6)))
    ys = torch.tensor(g.standard_normal((3, 128, 5))) + xs[:1, :, :5]
    whole_mb, r0_mb, r1_mb = MinibatchCKAGrid(32), MinibatchCKAGrid(32), MinibatchCKAGrid(32)
    whole_mb.update(list(xs), list(ys))
    r0_mb.update(list(xs[:, :64]), list(ys[:, :64]))
    r1_mb.update(list(xs[:, 64:]), list(ys[:, 64:]))
    _summed(r0_mb, r1_mb, lambda grid, ex: grid.sum_over(ex, 2, 3))
    np.testing.assert_allclose(r0_mb.matrix(), whole_mb.matrix(), rtol=1e-12)
    assert r0_mb.batches == 4

    whole, r0, r1 = StreamingCKAGrid(), StreamingCKAGrid(), StreamingCKAGrid()
    whole.update(xs, ys)
    pa, pb = xs[:, :64].mean(1), ys[:, :64].mean(1)
    r0.update(xs[:, :64], ys[:, :64])  # pilots = this first batch's means
    r1.set_pilots(pa, pb)  # the other rank takes the same pilots
    r1.update(xs[:, 64:], ys[:, 64:])
    _summed(r0, r1, lambda grid, ex: grid.sum_over(ex))
    assert r0.n == 128
    for name, m in r0.matrices().items():
        np.testing.assert_allclose(m, whole.matrices()[name], rtol=1e-10)


def test_scaled_pair_is_two_grids_and_pending_rows_are_copies():
    """ScaledMinibatchCKAGrids (kernels once, scaled by w_i w_j) gives what two MinibatchCKAGrids
    over x and w * x give; what waits for a minibatch holds none of the caller's tensors."""
    from itda.comparison.minibatch import ScaledMinibatchCKAGrids

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(150, 6, generator=g) for _ in range(3)]
    ys = [torch.randn(150, 5, generator=g) + xs[0][:, :5] for _ in range(2)]
    wx = [torch.rand(150, generator=g) + 0.5 for _ in xs]
    wy = [torch.rand(150, generator=g) + 0.5 for _ in ys]
    pair, unit, scaled = ScaledMinibatchCKAGrids(40), MinibatchCKAGrid(40), MinibatchCKAGrid(40)
    for s, e in ((0, 33), (33, 150)):
        pair.update([x[s:e] for x in xs], [y[s:e] for y in ys], [w[s:e] for w in wx], [w[s:e] for w in wy])
        unit.update([x[s:e] for x in xs], [y[s:e] for y in ys])
        scaled.update(
            [x[s:e].double() * w[s:e, None] for x, w in zip(xs, wx, strict=True)],
            [y[s:e].double() * w[s:e, None] for y, w in zip(ys, wy, strict=True)],
        )
    assert pair.unit.batches == unit.batches == 3
    np.testing.assert_allclose(pair.unit.matrix(), unit.matrix(), rtol=1e-12)
    np.testing.assert_allclose(pair.scaled.matrix(), scaled.matrix(), rtol=1e-12)
    assert not np.allclose(pair.unit.matrix(), pair.scaled.matrix())
    inputs = {t.untyped_storage().data_ptr() for t in xs + ys}
    waiting = [t for p in unit._pending_x + unit._pending_y for t in p]
    assert waiting and all(t.untyped_storage().data_ptr() not in inputs for t in waiting)
