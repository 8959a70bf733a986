"""Reconstruction metrics of an SAE over a stream of activations (float64 sums)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from itda.evaluate.metrics import ReconSums
from itda.sae.model import TopKSAE


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


class SaeEvaluator:
    """Same interface as itda.evaluate.Evaluator: update(x_BD) per batch, then report()."""

    def __init__(self, sae: TopKSAE):
        self.sae = sae
        self.sums = ReconSums(sae.cfg.d_in, sae.cfg.n_latents)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor) -> None:
        self.sae.eval()
        x = x_BD.to(device=self.sae.device, dtype=torch.float32)
        enc = self.sae.encode(x, batch=False)
        x_hat = self.sae.decode(enc.top_acts, enc.top_indices)
        x64, xh64 = x.double(), x_hat.double()
        self.sums.add(x64, (x64 * x64).sum(1), ((x64 - xh64) ** 2).sum(1),
                      torch.nn.functional.cosine_similarity(x64, xh64, dim=1), enc.top_indices[enc.top_acts > 0])

    def report(self) -> SaeEvalReport:
        s = self.sums
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
