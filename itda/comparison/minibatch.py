"""Minibatch CKA for all layer pairs in memory bounded independently of L^2 d^2.

Nguyen, Raghu & Kornblith (2021): split the paired tokens into minibatches of m rows; in each,
for every layer the linear kernel K = X X^T (m x m) with its diagonal zeroed; the unbiased
HSIC (Song et al. 2012) of every pair of layers,
  HSIC1(K, L) = [tr(K~L~) + (1^T K~ 1)(1^T L~ 1)/((m-1)(m-2)) - 2/(m-2) 1^T K~ L~ 1] / (m(m-3)),
comes from three matrix products over the flattened kernels of all layers; the estimate is
  CKA = mean_b HSIC1(K_b, L_b) / sqrt(mean_b HSIC1(K_b, K_b) mean_b HSIC1(L_b, L_b)).
Memory: the current minibatch's kernels, (L_A + L_B) m^2 floats, plus O(L_A L_B) sums — never
d^2. Unbiased per minibatch, so the estimate does not drift with m the way biased CKA does.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from itda.errors import ItdaInputError


def _kernels(xs, m: int) -> torch.Tensor:
    """[L, m*m] flattened zero-diagonal linear kernels (float64) of the layers' [m, d] rows."""
    out = torch.empty(len(xs), m * m, dtype=torch.float64)
    for i, x in enumerate(xs):
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
        if x.shape[0] != m:
            raise ItdaInputError(f"minibatch rows differ: {x.shape[0]} vs {m}")
        if not bool(torch.isfinite(x).all()):
            raise ItdaInputError("activations contain NaN or inf")
        k = x @ x.T
        k.fill_diagonal_(0.0)
        out[i] = k.reshape(-1)
    return out


def _unbiased(
    kl_tr: torch.Tensor, k_sum: torch.Tensor, l_sum: torch.Tensor, kl_one: torch.Tensor, m: int
) -> torch.Tensor:
    return (kl_tr + torch.outer(k_sum, l_sum) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * kl_one) / (m * (m - 3))


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
        self._pending_x.append([torch.as_tensor(x) for x in xs])
        self._pending_y.append([torch.as_tensor(y) for y in ys])
        self._pending_rows += n
        while self._pending_rows >= self.m:
            bx = [torch.cat([p[i] for p in self._pending_x]) for i in range(len(xs))]
            by = [torch.cat([p[j] for p in self._pending_y]) for j in range(len(ys))]
            self._add([x[: self.m] for x in bx], [y[: self.m] for y in by])
            rest = bx[0].shape[0] - self.m
            self._pending_x = [[x[self.m :] for x in bx]] if rest else []
            self._pending_y = [[y[self.m :] for y in by]] if rest else []
            self._pending_rows = rest

    def _add(self, xs, ys) -> None:
        m = self.m
        ka, kb = _kernels(xs, m), _kernels(ys, m)
        sa, sb = ka.sum(1), kb.sum(1)
        ra = ka.view(len(xs), m, m).sum(2)  # K~ 1 per layer: [L_A, m]
        rb = kb.view(len(ys), m, m).sum(2)
        ab = _unbiased(ka @ kb.T, sa, sb, ra @ rb.T, m)
        aa = torch.diagonal(_unbiased(ka @ ka.T, sa, sa, ra @ ra.T, m))
        bb = torch.diagonal(_unbiased(kb @ kb.T, sb, sb, rb @ rb.T, m))
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
        return (layers_a + layers_b) * minibatch * minibatch * 8 * 2 + layers_a * layers_b * 8 * 4


def exact_grid_bytes(layers_a: int, d_a: int, layers_b: int, d_b: int) -> int:
    """Accumulator memory of the exact StreamingCKAGrid (float64): cross products and per-side Grams."""
    return 8 * (
        layers_a * d_a * layers_b * d_b
        + layers_a * d_a * d_a
        + layers_b * d_b * d_b
        + layers_a * layers_b * (d_a + d_b)
    )
