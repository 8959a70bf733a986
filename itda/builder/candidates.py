"""Candidate helpers of the greedy builder: duplicate removal, dissimilar subsets (pure math)."""

from __future__ import annotations

import numpy as np
import torch

from itda.pursuit.jit import njit_cached


@njit_cached()
def _greedy_dissimilar(abs_cos_MM, eligible_M, min_cosine, accept_M):
    m = abs_cos_MM.shape[0]
    for i in range(m):
        if not eligible_M[i]:
            continue
        ok = True
        for j in range(i):
            if accept_M[j] and abs_cos_MM[i, j] >= min_cosine:
                ok = False
                break
        accept_M[i] = ok


def greedy_dissimilar(unit_MD: torch.Tensor, eligible_M: torch.Tensor, min_cosine: float) -> torch.Tensor:
    """Accept rows in order unless |cos| with an earlier accepted row is >= min_cosine.

    A rejected row r has an accepted atom a with |<r, a>| >= min_cosine, so matching pursuit
    over any dictionary containing a reconstructs r with cosine >= min_cosine: it would not
    pass the threshold once a is in the dictionary.
    """
    abs_cos = (unit_MD @ unit_MD.T).abs().cpu().numpy().astype(np.float32)
    accept = np.zeros(unit_MD.shape[0], dtype=np.bool_)
    _greedy_dissimilar(abs_cos, eligible_M.cpu().numpy(), np.float32(min_cosine), accept)
    return torch.from_numpy(accept).to(unit_MD.device)


def first_unique_rows(rows_MD: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the first occurrence of each distinct row."""
    if rows_MD.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=rows_MD.device)
    _, inverse = torch.unique(rows_MD, dim=0, return_inverse=True)
    positions = torch.arange(rows_MD.shape[0], device=rows_MD.device)
    first = torch.full((int(inverse.max()) + 1,), rows_MD.shape[0], dtype=torch.int64, device=rows_MD.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    mask = torch.zeros(rows_MD.shape[0], dtype=torch.bool, device=rows_MD.device)
    mask[first] = True
    return mask
