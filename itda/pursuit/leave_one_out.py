"""Matching pursuit that leaves one atom out per row: a row that is itself an atom is encoded
by the rest of the dictionary (an atom reconstructs itself exactly, which says nothing)."""

from __future__ import annotations

import torch

from itda.pursuit.api import Backend, matching_pursuit
from itda.pursuit.codes import SparseCodes


def matching_pursuit_leave_one_out(
    x_BD: torch.Tensor,
    atoms_ND: torch.Tensor,
    k: int,
    own_B: torch.Tensor,
    *,
    gram: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> SparseCodes:
    """MP of rows x [B, d] over unit atoms [N, d] with k steps, where row b may not use atom
    own_B[b] (int64 [B]; -1: no restriction).

    The Gram kernels' MP with that atom's correlation masked (never selectable): exactly MP over
    the dictionary without it, at the cost of plain MP. A row left with no atom (N = 1, its own)
    gets index -1 and coefficient 0. `gram` (atoms @ atoms.T) may be passed to reuse it across
    calls. Assumes x finite (callers validate).
    """
    return matching_pursuit(x_BD, atoms_ND, k, gram=gram, backend=backend, check_finite=False, exclude=own_B)
