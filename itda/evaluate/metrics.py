"""Per-row reconstruction terms and the ITDA loss (pure math, no I/O)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from itda.pursuit.codes import SparseCodes, decode


class ReconTerms(NamedTuple):
    """Per-row float32 terms of x against its reconstruction x_hat."""

    x_sq: torch.Tensor  # ||x||^2
    xhat_sq: torch.Tensor  # ||x_hat||^2
    dot: torch.Tensor  # <x, x_hat>
    err_sq: torch.Tensor  # ||x - x_hat||^2

    @property
    def cosine(self) -> torch.Tensor:
        """cos(x, x_hat); 0 where either vector is zero (an empty reconstruction)."""
        denom = (self.x_sq * self.xhat_sq).sqrt()
        return torch.where(denom > 0, self.dot / denom.clamp(min=1e-30), torch.zeros_like(denom))


def recon_terms(x_BD: torch.Tensor, codes: SparseCodes, atoms_ND: torch.Tensor, chunk: int = 256) -> ReconTerms:
    """Compute ReconTerms by decoding rows in chunks (never more than chunk x k x d at once)."""
    x32 = x_BD.to(device=atoms_ND.device, dtype=torch.float32)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, x32.shape[0], chunk):
        sub = SparseCodes(*(t[s : s + chunk] for t in codes))
        xhat = decode(sub, atoms_ND)
        xs = x32[s : s + chunk]
        diff = xs - xhat
        parts.append(((xs * xs).sum(1), (xhat * xhat).sum(1), (xs * xhat).sum(1), (diff * diff).sum(1)))
    if not parts:
        z = torch.zeros(0, device=atoms_ND.device)
        return ReconTerms(z, z, z, z)
    return ReconTerms(*(torch.cat(col) for col in zip(*parts)))


def normalised_loss(cosine: torch.Tensor, d: int) -> torch.Tensor:
    """The reference loss mean((x/|x| - x_hat/|x_hat|)^2) = (2 - 2 cos) / d."""
    return (2.0 - 2.0 * cosine) / d
