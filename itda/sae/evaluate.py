"""Reconstruction metrics of an SAE over a stream of activations (float64 sums).

Rows are encoded in chunks of at most EVAL_CHUNK_BYTES of [rows, F] pre-activations; a chunk
whose RMS norm is outside float32's comfortable range is encoded in power-of-two units
(exact), so every finite input gives finite metrics or a one-line error, never a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from itda.errors import ItdaInputError
from itda.evaluation.metrics import ReconSums
from itda.sae.model import TopKSAE, activation_units

EVAL_CHUNK_BYTES = 2**30


@dataclass
class SaeEvalReport:
    tokens: int
    k: int
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    mean_cosine: float
    l0: float  # mean latents with non-zero activation per token
    n_latents: int
    dead_latents: int  # latents never active on these tokens
    usage: torch.Tensor  # [F] int64 tokens activating each latent

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("usage")
        return out


def _pow2_rows(x_BD: torch.Tensor) -> torch.Tensor:
    """Each row times the power of two that brings its largest |entry| into [0.5, 1) (exact; zero rows stay zero)."""
    e = torch.frexp(x_BD.abs().amax(dim=1)).exponent
    return torch.ldexp(x_BD, -e[:, None].to(x_BD.dtype))


class SaeEvaluator:
    """Same interface as itda.evaluation.Evaluator: update(x_BD) per batch, then report()."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        self.sums = ReconSums(sae.cfg.d_in, sae.cfg.n_latents)
        self._first: torch.Tensor | None = None  # the first row, until a different one is seen
        self._varies = False

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor) -> None:
        self.sae.eval()
        x = x_BD.to(device=self.sae.device, dtype=torch.float32)
        rows = max(1, EVAL_CHUNK_BYTES // (8 * self.sae.cfg.n_latents))  # linear output + relu: two [rows, F]
        for s in range(0, x.shape[0], rows):
            self._add(x[s : s + rows])

    def _add(self, x: torch.Tensor) -> None:
        if not self._varies:
            self._first = x[0].clone() if self._first is None else self._first
            self._varies = bool((x != self._first).any())
        units = activation_units(x)
        enc = self.sae.encode(x, training=False, units=units)
        x_hat = self.sae.decode(enc.top_acts, enc.top_indices, units=units)
        if not bool(torch.isfinite(x_hat).all()):
            raise ItdaInputError(
                "the SAE's reconstruction of these activations is not finite (NaN weights, or float32 overflow)"
            )
        x64, xh64 = x.double(), x_hat.double() * units
        cos = torch.nn.functional.cosine_similarity(
            _pow2_rows(x64), _pow2_rows(xh64), dim=1
        )  # no eps clamp on small rows
        self.sums.add(x64, (x64 * x64).sum(1), ((x64 - xh64) ** 2).sum(1), cos, enc.top_indices[enc.top_acts > 0])

    def report(self) -> SaeEvalReport:
        """The metrics so far; refused when FVU is undefined (no rows, or rows without variance)."""
        s = self.sums
        if s.n == 0:
            raise ItdaInputError("no activations to evaluate the SAE on")
        if not self._varies:
            raise ItdaInputError(f"the {s.n} activations have no variance (all rows are equal): FVU is undefined")
        if not math.isfinite(s.fvu):
            raise ItdaInputError(
                f"FVU is undefined on these {s.n} activations: their variance is below float64 precision "
                "about their mean"
            )
        return SaeEvalReport(
            tokens=s.n,
            k=self.sae.cfg.k,
            fvu=s.fvu,
            mean_cosine=s.mean(s.sum_cos),
            l0=s.mean(s.sum_l0),
            n_latents=self.sae.cfg.n_latents,
            dead_latents=int((s.usage == 0).sum()),
            usage=s.usage.clone(),
        )


def evaluate_sae(sae: TopKSAE, batches: Iterable[torch.Tensor]) -> SaeEvalReport:
    ev = SaeEvaluator(sae)
    for x in batches:
        ev.update(x[0] if isinstance(x, tuple) else x)
    return ev.report()
