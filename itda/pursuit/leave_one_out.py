"""Matching pursuit that leaves one atom out per row: a row that is itself an atom is encoded
by the rest of the dictionary (an atom reconstructs itself exactly, which says nothing)."""

from __future__ import annotations

import torch

from itda.pursuit.api import matching_pursuit
from itda.pursuit.codes import SparseCodes


def _mp_excluding(x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int, own_B: torch.Tensor) -> SparseCodes:
    """Textbook MP (first index on ties) of float32 rows, atom own_B[b] never picked for row b."""
    b = x_BD.shape[0]
    rows_B = torch.arange(b, device=x_BD.device)
    resid_BD = x_BD.clone()
    idx_BK = torch.empty(b, k, dtype=torch.int64, device=x_BD.device)
    val_BK = torch.empty(b, k, dtype=torch.float32, device=x_BD.device)
    for t in range(k):
        corr_BN = resid_BD @ atoms_ND.T
        corr_BN[rows_B, own_B] = 0.0
        j_B = corr_BN.abs().argmax(dim=1)
        alpha_B = corr_BN[rows_B, j_B]
        idx_BK[:, t], val_BK[:, t] = j_B, alpha_B
        resid_BD.addcmul_(atoms_ND.index_select(0, j_B), alpha_B[:, None], value=-1.0)
    energy_B = (x_BD * x_BD).sum(1) - (val_BK * val_BK).sum(1)
    return SparseCodes(idx_BK, val_BK, energy_B.clamp_(min=0.0))


def matching_pursuit_leave_one_out(
    x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int, own_B: torch.Tensor, *, chunk: int = 256
) -> SparseCodes:
    """MP of rows x [B, d] over unit atoms [N, d] with k steps, where row b may not use atom
    own_B[b] (int64 [B]; -1: no restriction, the row goes through `matching_pursuit`).

    Rows with an own atom are few (one per atom at most), so they take a residual-based torch
    loop (one [b, d] x [d, N] product per step); the result is MP over the dictionary without
    that atom (with N = 1 such a row gets coefficient 0). Assumes x finite (callers validate).
    """
    atoms = atoms_ND.to(torch.float32)
    x = x_BD.to(device=atoms.device, dtype=torch.float32)
    own = own_B.to(atoms.device)
    held = own >= 0
    if not bool(held.any()):
        return matching_pursuit(x, atoms, k, check_finite=False)
    b = x.shape[0]
    idx = torch.empty(b, k, dtype=torch.int64, device=atoms.device)
    val = torch.empty(b, k, dtype=torch.float32, device=atoms.device)
    res = torch.empty(b, dtype=torch.float32, device=atoms.device)
    free = torch.nonzero(~held).flatten()
    if len(free):
        idx[free], val[free], res[free] = matching_pursuit(x[free], atoms, k, check_finite=False)
    loo = torch.nonzero(held).flatten()
    for s in range(0, len(loo), chunk):
        r = loo[s : s + chunk]
        idx[r], val[r], res[r] = _mp_excluding(x[r], atoms, k, own[r])
    return SparseCodes(idx, val, res)
