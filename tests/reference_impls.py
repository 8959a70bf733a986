"""Independent float64 implementations that the tests compare against."""

from __future__ import annotations

import numpy as np


def mp_float64(x: np.ndarray, atoms: np.ndarray, k: int):
    """Textbook MP on explicit residuals. Returns indices, values, residual energy and the
    gap between the best and second-best |correlation| at each step (to spot near-ties)."""
    x = x.astype(np.float64)
    a = atoms.astype(np.float64)
    r = x.copy()
    b = x.shape[0]
    idx = np.zeros((b, k), np.int64)
    val = np.zeros((b, k))
    gap = np.zeros((b, k))
    for t in range(k):
        c = r @ a.T
        ac = np.abs(c)
        j = ac.argmax(1)
        part = np.partition(ac, -2, axis=1) if ac.shape[1] > 1 else np.concatenate([np.zeros_like(ac), ac], 1)
        gap[:, t] = part[:, -1] - part[:, -2]
        alpha = c[np.arange(b), j]
        idx[:, t], val[:, t] = j, alpha
        r -= alpha[:, None] * a[j]
    return idx, val, (r * r).sum(1), gap


def random_unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((n, d))
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def csls_loops(s: np.ndarray, k: int) -> np.ndarray:
    """CSLS written from its definition (Conneau et al. 2018): 2 S[i, j] minus the mean of row i's
    and of column j's k largest entries (k clamped to the line's length)."""
    out = np.empty_like(s, dtype=np.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            row, col = sorted(s[i], reverse=True), sorted(s[:, j], reverse=True)
            out[i, j] = 2 * s[i, j] - np.mean(row[:k]) - np.mean(col[:k])
    return out
