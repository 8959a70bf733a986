"""Minibatch CKA for all layer pairs in memory bounded independently of L^2 d^2.

Nguyen, Raghu & Kornblith (2021): split the paired tokens into minibatches of m rows; in each,
for every layer the linear kernel K = X X^T (m x m) with its diagonal zeroed; the unbiased
HSIC (Song et al. 2012) of every pair of layers,
  HSIC1(K, L) = [tr(K~L~) + (1^T K~ 1)(1^T L~ 1)/((m-1)(m-2)) - 2/(m-2) 1^T K~ L~ 1] / (m(m-3)),
comes from matrix products over the flattened kernels of all layers, summed over blocks of 128
kernel rows; the estimate is
  CKA = mean_b HSIC1(K_b, L_b) / sqrt(mean_b HSIC1(K_b, K_b) mean_b HSIC1(L_b, L_b)).
Memory: one block of every layer's kernel rows, (L_A + L_B) 128 m floats, the rows waiting for a
minibatch, plus O(L_A L_B) sums — never d^2. Unbiased per minibatch, so the estimate does not
drift with m the way biased CKA does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from itda.errors import ItdaInputError

_BLOCK = 128  # kernel rows per block: the [L, block * m] float64 blocks are all a minibatch holds


def _as_rows(xs, m: int) -> list[torch.Tensor]:
    """The layers' [m, d] rows on the CPU, checked (each made float64 when its kernel rows are)."""
    out = []
    for x in xs:
        x = torch.as_tensor(x).detach().to("cpu")
        if x.shape[0] != m:
            raise ItdaInputError(f"minibatch rows differ: {x.shape[0]} vs {m}")
        if not bool(torch.isfinite(x).all()):
            raise ItdaInputError("activations contain NaN or inf")
        out.append(x)
    return out


def _kernel_rows(xs: list[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """[L, (r1 - r0) * m] rows r0:r1 of the layers' zero-diagonal linear kernels, flattened (float64)."""
    m = xs[0].shape[0]
    out = torch.empty(len(xs), (r1 - r0) * m, dtype=torch.float64)
    diag = torch.arange(r1 - r0)
    for i, x in enumerate(xs):
        x = x.to(torch.float64)  # one layer's float64 copy at a time
        k = out[i].view(r1 - r0, m)
        torch.matmul(x[r0:r1], x.T, out=k)
        k[diag, diag + r0] = 0.0
    return out


class _Terms:
    """The sums one minibatch's unbiased HSIC needs, accumulated over kernel row blocks."""

    def __init__(self, la: int, lb: int, m: int):
        self.kl = torch.zeros(la, lb, dtype=torch.float64)  # tr(K~ L~)
        self.kk, self.ll = torch.zeros(la, dtype=torch.float64), torch.zeros(lb, dtype=torch.float64)
        self.ra, self.rb = torch.zeros(la, m, dtype=torch.float64), torch.zeros(lb, m, dtype=torch.float64)

    def add(self, ka: torch.Tensor, kb: torch.Tensor, r0: int, r1: int) -> None:
        self.kl += ka @ kb.T
        self.kk += torch.linalg.vector_norm(ka, dim=1) ** 2
        self.ll += torch.linalg.vector_norm(kb, dim=1) ** 2
        self.ra[:, r0:r1] = ka.view(len(ka), r1 - r0, -1).sum(2)  # K~ 1, these rows
        self.rb[:, r0:r1] = kb.view(len(kb), r1 - r0, -1).sum(2)


def _unbiased(
    kl_tr: torch.Tensor, k_sum: torch.Tensor, l_sum: torch.Tensor, kl_one: torch.Tensor, m: int
) -> torch.Tensor:
    return (kl_tr + torch.outer(k_sum, l_sum) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * kl_one) / (m * (m - 3))


def _unbiased_diag(kk: torch.Tensor, k_sum: torch.Tensor, kk_one: torch.Tensor, m: int) -> torch.Tensor:
    """HSIC1(K, K) per layer, from tr(K~ K~), 1^T K~ 1 and |K~ 1|^2."""
    return (kk + k_sum * k_sum / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * kk_one) / (m * (m - 3))


def _take(pending: list[list[torch.Tensor]], m: int) -> list[torch.Tensor]:
    """The first m pending rows of every layer, removed from `pending` (pieces in arrival order)."""
    parts: list[list[torch.Tensor]] = []
    need = m
    while need:
        piece = pending[0]
        rows = piece[0].shape[0]
        if rows <= need:
            parts.append(pending.pop(0))
            need -= rows
        else:
            parts.append([x[:need] for x in piece])
            pending[0] = [x[need:] for x in piece]
            need = 0
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


class MinibatchCKAGrid:
    """Accumulate unbiased HSIC over minibatches for every (layer of A, layer of B)."""

    needs_pilots = False  # StreamingCKAGrid's interface: no pilot means to share

    def __init__(self, minibatch: int = 1024, layers: tuple[int, int] | None = None):
        """layers: (L_A, L_B), so that a rank that saw no full minibatch still sums (see sum_over)."""
        if minibatch < 4:
            raise ItdaInputError(f"minibatch must be >= 4 rows, got {minibatch}")
        self.m = minibatch
        self.layers = layers
        self.batches = 0
        self.hsic_ab: torch.Tensor | None = None
        self.hsic_aa: torch.Tensor | None = None
        self.hsic_bb: torch.Tensor | None = None
        self._pending_x: list[list[torch.Tensor]] = []
        self._pending_y: list[list[torch.Tensor]] = []
        self._pending_rows = 0

    def update(self, xs, ys) -> None:
        """Paired rows of every layer (lists [n, d] or [L, n, d]); full minibatches are used, the rest waits."""
        xs, ys = list(xs), list(ys)
        n = xs[0].shape[0]
        if any(x.shape[0] != n for x in xs) or any(y.shape[0] != n for y in ys):
            raise ItdaInputError("paired batches differ in rows")
        if not n:
            return
        self._pending_x.append([torch.as_tensor(x) for x in xs])
        self._pending_y.append([torch.as_tensor(y) for y in ys])
        self._pending_rows += n
        while self._pending_rows >= self.m:
            self._add(_take(self._pending_x, self.m), _take(self._pending_y, self.m))
            self._pending_rows -= self.m
        # what waits is copied, so that the callers' batches are not kept alive by it
        self._pending_x = [[x.clone() for x in p] for p in self._pending_x]
        self._pending_y = [[y.clone() for y in p] for p in self._pending_y]

    def _add(self, xs, ys) -> None:
        m = self.m
        xs, ys = _as_rows(xs, m), _as_rows(ys, m)
        terms = _Terms(len(xs), len(ys), m)
        for r0 in range(0, m, _BLOCK):
            r1 = min(r0 + _BLOCK, m)
            terms.add(_kernel_rows(xs, r0, r1), _kernel_rows(ys, r0, r1), r0, r1)
        self._add_terms(terms)

    def _add_terms(self, terms: _Terms) -> None:
        """One minibatch's unbiased HSIC of every layer pair into the sums."""
        m = self.m
        sa, sb = terms.ra.sum(1), terms.rb.sum(1)
        ab = _unbiased(terms.kl, sa, sb, terms.ra @ terms.rb.T, m)
        aa = _unbiased_diag(terms.kk, sa, (terms.ra * terms.ra).sum(1), m)
        bb = _unbiased_diag(terms.ll, sb, (terms.rb * terms.rb).sum(1), m)
        sums = self._sums()
        if sums is None:
            self.hsic_ab, self.hsic_aa, self.hsic_bb = ab, aa, bb
        else:
            sums[0].add_(ab)
            sums[1].add_(aa)
            sums[2].add_(bb)
        self.batches += 1

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(hsic_ab, hsic_aa, hsic_bb), or None before the first minibatch (the three are set together)."""
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            return None
        return self.hsic_ab, self.hsic_aa, self.hsic_bb

    def sum_over(self, exchange, layers_a: int | None = None, layers_b: int | None = None) -> None:
        """Add up the minibatch sums of all ranks (each rank's own minibatches; a remainder
        shorter than a minibatch stays unused on each rank); layer counts default to `layers`."""
        if layers_a is None and self.layers is not None:
            layers_a, layers_b = self.layers
        sums = self._sums()
        if sums is None:
            if layers_a is None or layers_b is None:
                raise TypeError("a rank without a full minibatch needs the layer counts: layers=(L_A, L_B)")
            sums = (
                torch.zeros(layers_a, layers_b, dtype=torch.float64),
                torch.zeros(layers_a, dtype=torch.float64),
                torch.zeros(layers_b, dtype=torch.float64),
            )
            self.hsic_ab, self.hsic_aa, self.hsic_bb = sums
        count = torch.tensor([float(self.batches)], dtype=torch.float64)
        exchange.sum_(count)
        for t in sums:
            exchange.sum_(t)
        self.batches = int(count.item())

    def matrix(self) -> np.ndarray:
        """[L_A, L_B] minibatch CKA."""
        if self.batches == 0:
            raise ItdaInputError(f"minibatch CKA needs at least {self.m} paired rows")
        sums = self._sums()
        assert sums is not None  # batches > 0: a minibatch or sum_over has set the sums
        hsic_ab, hsic_aa, hsic_bb = sums
        den = torch.sqrt(torch.outer(hsic_aa.clamp(min=0), hsic_bb.clamp(min=0)))
        out = torch.where(den > 0, hsic_ab / den.clamp(min=1e-300), torch.full_like(den, math.nan))
        return out.numpy()

    def matrices(self, procrustes: bool = False) -> dict[str, np.ndarray]:
        """{'cka'} -> [L_A, L_B]: StreamingCKAGrid's interface (no debiased CKA, no Procrustes)."""
        return {"cka": self.matrix()}

    @staticmethod
    def memory_bytes(layers_a: int, layers_b: int, minibatch: int) -> int:
        """Bytes of one minibatch's kernel row blocks (float64, with their products) and the sums;
        the pending rows, fewer than a minibatch per layer, come on top."""
        block = min(_BLOCK, minibatch)
        return (layers_a + layers_b) * (2 * block + 2) * minibatch * 8 + layers_a * layers_b * 8 * 5


class ScaledMinibatchCKAGrids:
    """Two MinibatchCKAGrids over the same paired rows: `unit` of the rows x_t, `scaled` of the rows
    times per-row weights w_t. The scaled kernels are the unit ones times w_i w_j, so each
    minibatch's kernels are computed once for both."""

    def __init__(self, minibatch: int = 1024, layers: tuple[int, int] | None = None):
        self.unit, self.scaled = MinibatchCKAGrid(minibatch, layers), MinibatchCKAGrid(minibatch, layers)
        self.m = minibatch
        self._pending: list[list[torch.Tensor]] = []  # per update: x rows of every layer, y rows, weights
        self._sizes = (0, 0)
        self._pending_rows = 0

    def update(self, xs, ys, wx, wy) -> None:
        """Paired rows xs [L_A] x [n, d_A], ys [L_B] x [n, d_B] and their weights wx [L_A] x [n], wy [L_B] x [n]."""
        xs, ys, wx, wy = list(xs), list(ys), list(wx), list(wy)
        n = xs[0].shape[0]
        if any(t.shape[0] != n for t in xs + ys + wx + wy):
            raise ItdaInputError("paired batches differ in rows")
        if not n:
            return
        self._sizes = (len(xs), len(ys))
        self._pending.append([torch.as_tensor(t) for t in xs + ys + wx + wy])
        self._pending_rows += n
        while self._pending_rows >= self.m:
            self._add(_take(self._pending, self.m))
            self._pending_rows -= self.m
        self._pending = [[t.clone() for t in p] for p in self._pending]

    def _add(self, rows: list[torch.Tensor]) -> None:
        la, lb = self._sizes
        m = self.m
        xs, ys = _as_rows(rows[:la], m), _as_rows(rows[la : la + lb], m)
        wx = torch.stack([w.to(torch.float64) for w in rows[la + lb : 2 * la + lb]])
        wy = torch.stack([w.to(torch.float64) for w in rows[2 * la + lb :]])
        unit, scaled = _Terms(la, lb, m), _Terms(la, lb, m)
        for r0 in range(0, m, _BLOCK):
            r1 = min(r0 + _BLOCK, m)
            ka, kb = _kernel_rows(xs, r0, r1), _kernel_rows(ys, r0, r1)
            unit.add(ka, kb, r0, r1)
            for k, w in ((ka, wx), (kb, wy)):  # in place: K_ij w_i w_j
                for i in range(len(k)):
                    k[i].view(r1 - r0, m).mul_(torch.outer(w[i, r0:r1], w[i]))
            scaled.add(ka, kb, r0, r1)
        self.unit._add_terms(unit)
        self.scaled._add_terms(scaled)


def exact_grid_bytes(layers_a: int, d_a: int, layers_b: int, d_b: int) -> int:
    """Accumulator memory of the exact StreamingCKAGrid (float64): cross products and per-side Grams."""
    return 8 * (
        layers_a * d_a * layers_b * d_b
        + layers_a * d_a * d_a
        + layers_b * d_b * d_b
        + layers_a * layers_b * (d_a + d_b)
    )
