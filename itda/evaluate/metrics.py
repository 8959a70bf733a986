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


class ReconSums:
    """Running float64 sums over batches of (x, its reconstruction) for FVU, mean cosine, L0 and
    per-code-unit usage; shared by the dictionary and SAE evaluators."""

    def __init__(self, d: int, n_units: int):
        self.n = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_x_sq = 0.0
        self.sum_err = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0
        self.usage = torch.zeros(n_units, dtype=torch.int64)

    def add(self, x_BD: torch.Tensor, x_sq_B: torch.Tensor, err_sq_B: torch.Tensor, cos_B: torch.Tensor,
            used_units: torch.Tensor) -> None:
        """One batch: its rows, per-row |x|^2, |x - x_hat|^2 and cosine, and the unit index of every
        (row, active unit) pair (each unit once per row)."""
        self.n += x_BD.shape[0]
        self.sum_x += x_BD.detach().to("cpu", torch.float64).sum(0)
        self.sum_x_sq += float(x_sq_B.double().sum())
        self.sum_err += float(err_sq_B.double().sum())
        self.sum_cos += float(cos_B.double().sum())
        self.sum_l0 += int(used_units.numel())
        self.usage += torch.bincount(used_units.cpu(), minlength=len(self.usage))

    @property
    def fvu(self) -> float:
        """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (NaN when the rows have no variance)."""
        total_var = self.sum_x_sq - float((self.sum_x * self.sum_x).sum()) / max(self.n, 1)
        return self.sum_err / total_var if total_var > 0 else float("nan")

    def mean(self, total: float) -> float:
        return total / max(self.n, 1)
