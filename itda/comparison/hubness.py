"""Hubness correction of a layer-similarity matrix: cross-domain similarity local scaling (CSLS).

In a matrix of layer similarities some layers are "hubs": similar to several layers of the other
model (adjacent layers of a residual stream differ little, and some stand nearer the rest than
others). An argmax over a row then picks the hub rather than the partner. CSLS (Conneau et al.,
"Word translation without parallel data", ICLR 2018) scores a pair by how far it stands above
both layers' usual similarity:

    csls(S)[i, j] = 2 S[i, j] - r_A[i] - r_B[j],
    r_A[i] = mean of the k largest entries of row i,  r_B[j] = the same for column j,

with k clamped to the other side's number of layers. A NaN entry makes its row and column NaN
(they have no usual similarity). Pure numpy; no I/O.
"""

from __future__ import annotations

import numpy as np

CSLS_K = 2  # layer grids are small (8-30 layers a side): the two nearest partners


def top_k_mean(s: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Mean of the k largest entries along `axis` (k clamped to that axis's length), kept as a dimension."""
    k = max(1, min(k, s.shape[axis]))
    return np.sort(s, axis=axis).take(range(s.shape[axis] - k, s.shape[axis]), axis=axis).mean(axis, keepdims=True)


def csls(s_AB: np.ndarray, k: int = CSLS_K) -> np.ndarray:
    """The CSLS-corrected [L_A, L_B] matrix (k = 0: `s_AB` unchanged). Symmetric input gives symmetric output."""
    s = np.asarray(s_AB, dtype=np.float64)
    if k == 0 or not s.size:
        return s
    return 2 * s - top_k_mean(s, k, axis=1) - top_k_mean(s, k, axis=0)
