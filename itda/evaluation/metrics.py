"""Per-row reconstruction terms and the ITDA loss (pure math, no I/O)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from itda.pursuit.codes import SparseCodes, decode


class ReconTerms(NamedTuple):
    """Per-row terms of x against its reconstruction x_hat, finite for every finite float32 input.

    Each row pair is scaled by a power of two before squaring (exact: the cosine is bit for bit the
    plain float32 one), and the squared terms are float64 after scaling back, so rows near the
    float32 limit give finite sums instead of inf.
    """

    x_sq: torch.Tensor  # ||x||^2, float64
    xhat_sq: torch.Tensor  # ||x_hat||^2, float64
    dot: torch.Tensor  # <x, x_hat>, float64
    err_sq: torch.Tensor  # ||x - x_hat||^2, float64
    cosine: torch.Tensor  # cos(x, x_hat), float32; 0 where either vector is zero (an empty reconstruction)


def row_exponents(*rows_BD: torch.Tensor) -> torch.Tensor:
    """Per row, the power-of-two exponent e with max |component| (over all given tensors) in [2^(e-1), 2^e)."""
    top = torch.stack([r.abs().amax(dim=1) if r.shape[1] else r.new_zeros(r.shape[0]) for r in rows_BD]).amax(dim=0)
    return torch.frexp(top).exponent


def unit_rows(x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / ||x|| in float32, ||x|| in float64) per row, exact for any finite input; zero rows stay zero."""
    e = row_exponents(x_BD)
    scaled = torch.ldexp(x_BD.to(torch.float32), -e[:, None].to(torch.float32))
    norm = scaled.norm(dim=1)
    unit = torch.where(norm[:, None] > 0, scaled / norm.clamp(min=torch.finfo(torch.float32).tiny)[:, None], scaled)
    return unit, torch.ldexp(norm.double(), e.double())


def _scaled_terms(xs: torch.Tensor, xhat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    e = row_exponents(xs, xhat)[:, None].to(torch.float32)
    xs, xhat = torch.ldexp(xs, -e), torch.ldexp(xhat, -e)
    diff = xs - xhat
    x_sq, xhat_sq, dot, err_sq = (xs * xs).sum(1), (xhat * xhat).sum(1), (xs * xhat).sum(1), (diff * diff).sum(1)
    denom = (x_sq * xhat_sq).sqrt()
    cosine = torch.where(denom > 0, dot / denom.clamp(min=1e-30), torch.zeros_like(denom))
    back = torch.ldexp(torch.ones_like(x_sq, dtype=torch.float64), 2 * e[:, 0].double())
    return x_sq.double() * back, xhat_sq.double() * back, dot.double() * back, err_sq.double() * back, cosine


def recon_terms(x_BD: torch.Tensor, codes: SparseCodes, atoms_ND: torch.Tensor, chunk: int = 256) -> ReconTerms:
    """Compute ReconTerms by decoding rows in chunks (never more than chunk x k x d at once)."""
    x32 = x_BD.to(device=atoms_ND.device, dtype=torch.float32)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, x32.shape[0], chunk):
        sub = SparseCodes(*(t[s : s + chunk] for t in codes))
        parts.append(_scaled_terms(x32[s : s + chunk], decode(sub, atoms_ND)))
    if not parts:
        z = torch.zeros(0, device=atoms_ND.device, dtype=torch.float64)
        return ReconTerms(z, z, z, z, z.float())
    return ReconTerms(*(torch.cat(col) for col in zip(*parts, strict=True)))


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

    def add(
        self,
        x_BD: torch.Tensor,
        x_sq_B: torch.Tensor,
        err_sq_B: torch.Tensor,
        cos_B: torch.Tensor,
        used_units: torch.Tensor,
    ) -> None:
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
