"""Sparse coding over a fixed dictionary: matching pursuit and batch-OMP."""

from itda.pursuit.api import BACKENDS, matching_pursuit, orthogonal_matching_pursuit
from itda.pursuit.codes import SparseCodes, decode
from itda.pursuit.gram import GrowingGram, compute_gram

__all__ = [
    "BACKENDS",
    "GrowingGram",
    "SparseCodes",
    "compute_gram",
    "decode",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
]
