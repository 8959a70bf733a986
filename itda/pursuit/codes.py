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


def distinct_used(idx_BK: torch.Tensor, val_BK: torch.Tensor) -> torch.Tensor:
    """Mask [B, k] of the first slot of each distinct atom per row whose summed coefficient is non-zero."""
    b, k = idx_BK.shape
    order = torch.argsort(idx_BK, dim=1, stable=True)
    sorted_idx = idx_BK.gather(1, order)
    sorted_val = val_BK.gather(1, order)
    group_start = torch.ones_like(sorted_idx, dtype=torch.bool)
    group_start[:, 1:] = sorted_idx[:, 1:] != sorted_idx[:, :-1]
    group_id = group_start.cumsum(1) - 1
    sums = torch.zeros(b, k, dtype=torch.float64).scatter_add_(1, group_id, sorted_val.double())
    keep_sorted = group_start & (sums.gather(1, group_id) != 0) & (sorted_idx >= 0)
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask


def atom_totals(codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot [B, k]: the atom's total coefficient in its row (float64, MP may pick an atom twice),
    and the distinct_used mask keeping one slot per distinct atom with a non-zero total."""
    idx, val = codes.indices.cpu(), codes.values.cpu().double() * (codes.indices.cpu() >= 0)
    same_BKK = idx[:, :, None] == idx[:, None, :]
    return (same_BKK * val[:, None, :]).sum(2), distinct_used(idx, val)
