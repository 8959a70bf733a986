"""Sparse codes: the output of every pursuit kernel."""

from __future__ import annotations

from typing import NamedTuple

import torch


class SparseCodes(NamedTuple):
    """k (index, value) pairs per row.

    indices: [B, k] int64 atom indices; -1 marks an unused slot (OMP stopping early).
    values: [B, k] float32 coefficients; 0 in unused slots. MP may repeat an index:
        the atom's total coefficient is then the sum of its entries.
    residual_sq: [B] float32, squared norm of x - decode(codes), from the energy identity.
    """

    indices: torch.Tensor
    values: torch.Tensor
    residual_sq: torch.Tensor


def decode(codes: SparseCodes, atoms_ND: torch.Tensor) -> torch.Tensor:
    """x_hat [B, d] = sum_t values[:, t] * atoms[indices[:, t]] (float32)."""
    idx_BK = codes.indices.to(atoms_ND.device)
    val_BK = codes.values.to(device=atoms_ND.device, dtype=torch.float32)
    valid_BK = idx_BK >= 0
    gathered_BKD = atoms_ND[idx_BK.clamp(min=0)].to(torch.float32)
    return torch.einsum("bk,bkd->bd", val_BK * valid_BK, gathered_BKD)


def cat_codes(parts: list[SparseCodes]) -> SparseCodes:
    """Concatenate codes of consecutive row chunks."""
    return SparseCodes(*(torch.cat([getattr(p, f) for p in parts]) for f in SparseCodes._fields))
