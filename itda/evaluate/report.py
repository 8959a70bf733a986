"""Reconstruction quality of a dictionary over a stream of activations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from itda.dictionary import Dictionary
from itda.evaluate.metrics import normalised_loss, recon_terms
from itda.pursuit.codes import distinct_used


@dataclass
class EvalReport:
    tokens: int
    k: int
    fvu: float  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    mean_cosine: float
    normalised_loss: float  # mean of (2 - 2cos)/d, the reference's loss
    l0: float  # mean number of distinct atoms with non-zero coefficient per token
    n_atoms: int
    dead_atoms: int  # atoms never used
    usage: torch.Tensor  # [N] int64 tokens using each atom

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("usage")
        return out


class Evaluator:
    """Streaming accumulator (float64 sums) of EvalReport over batches."""

    def __init__(self, dictionary: Dictionary, k: int | None = None, method: str = "mp"):
        self.dictionary = dictionary
        self.k = dictionary.meta.k if k is None else k
        self.method = method
        self.n = 0
        self.sum_x = torch.zeros(dictionary.d, dtype=torch.float64)
        self.sum_x_sq = 0.0
        self.sum_err = 0.0
        self.sum_cos = 0.0
        self.sum_loss = 0.0
        self.sum_l0 = 0
        self.usage = torch.zeros(len(dictionary), dtype=torch.int64)

    def update(self, x_BD: torch.Tensor) -> None:
        codes = self.dictionary.encode(x_BD, self.k, method=self.method)
        terms = recon_terms(x_BD, codes, self.dictionary.atoms.to(torch.float32))
        cos = terms.cosine
        x64 = x_BD.to(torch.float64).cpu()
        self.n += x_BD.shape[0]
        self.sum_x += x64.sum(0)
        self.sum_x_sq += float(terms.x_sq.double().sum())
        self.sum_err += float(terms.err_sq.double().sum())
        self.sum_cos += float(cos.double().sum())
        self.sum_loss += float(normalised_loss(cos.double(), self.dictionary.d).sum())
        used = distinct_used(codes.indices.cpu(), codes.values.cpu())
        self.sum_l0 += int(used.sum())
        self.usage += torch.bincount(codes.indices.cpu()[used], minlength=len(self.dictionary))

    def report(self) -> EvalReport:
        n = max(self.n, 1)
        total_var = self.sum_x_sq - float((self.sum_x * self.sum_x).sum()) / n
        return EvalReport(
            tokens=self.n,
            k=self.k,
            fvu=self.sum_err / total_var if total_var > 0 else float("nan"),
            mean_cosine=self.sum_cos / n,
            normalised_loss=self.sum_loss / n,
            l0=self.sum_l0 / n,
            n_atoms=len(self.dictionary),
            dead_atoms=int((self.usage == 0).sum()),
            usage=self.usage.clone(),
        )


def evaluate(dictionary: Dictionary, batches: Iterable[torch.Tensor], k: int | None = None, method: str = "mp") -> EvalReport:
    ev = Evaluator(dictionary, k, method)
    for x in batches:
        ev.update(x[0] if isinstance(x, tuple) else x)
    return ev.report()
