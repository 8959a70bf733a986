"""Linear CKA of one pair of representations, shared by the baseline and the ITDA measures."""

from __future__ import annotations

import torch

from itda.comparison.result import Similarity
from itda.comparison.streaming import StreamingCKA


def linear_cka(x, y) -> dict[str, Similarity]:
    """Biased and debiased linear CKA and Procrustes similarity (exact, via StreamingCKA)."""
    acc = StreamingCKA()
    acc.update(x, y)
    return acc.result()


def gram_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased linear CKA from the centred float64 cross-covariance, ||A^T B||^2 / (||A^T A|| ||B^T B||)
    (no debiased term, no Procrustes SVD; 0 for a constant side)."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    num = float((a.T @ b).pow(2).sum())
    den = float((a.T @ a).norm() * (b.T @ b).norm())
    return num / den if den > 0 else 0.0
