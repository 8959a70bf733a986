"""Reconstruction metrics of an SAE over a stream of activations (float64 sums)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

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
        self.n = 0
        self.sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
        self.sum_x_sq = 0.0
        self.sum_err = 0.0
        self.sum_cos = 0.0
        self.sum_l0 = 0
        self.usage = torch.zeros(sae.cfg.n_latents, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x_BD: torch.Tensor) -> None:
        self.sae.eval()
        x = x_BD.to(device=self.sae.device, dtype=torch.float32)
        enc = self.sae.encode(x, batch=False)
        x_hat = self.sae.decode(enc.top_acts, enc.top_indices)
        active = enc.top_acts > 0
        x64, xh64 = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += x64.sum(0).cpu()
        self.sum_x_sq += float((x64 * x64).sum())
        self.sum_err += float(((x64 - xh64) ** 2).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(x64, xh64, dim=1).sum())
        self.sum_l0 += int(active.sum())
        self.usage += torch.bincount(enc.top_indices[active].cpu(), minlength=self.sae.cfg.n_latents)

    def report(self) -> SaeEvalReport:
        n = max(self.n, 1)
        total_var = self.sum_x_sq - float((self.sum_x * self.sum_x).sum()) / n
        return SaeEvalReport(
            tokens=self.n,
            k=self.sae.cfg.k,
            fvu=self.sum_err / total_var if total_var > 0 else float("nan"),
            mean_cosine=self.sum_cos / n,
            l0=self.sum_l0 / n,
            n_latents=self.sae.cfg.n_latents,
            dead_latents=int((self.usage == 0).sum()),
            usage=self.usage.clone(),
        )


def evaluate_sae(sae: TopKSAE, batches: Iterable[torch.Tensor]) -> SaeEvalReport:
    ev = SaeEvaluator(sae)
    for x in batches:
        ev.update(x[0] if isinstance(x, tuple) else x)
    return ev.report()
