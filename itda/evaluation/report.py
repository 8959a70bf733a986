"""Reconstruction quality of a dictionary over a stream of activations."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from itda.dictionary import Dictionary
from itda.evaluation.metrics import ReconSums, normalised_loss, recon_terms
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
        self.sums = ReconSums(dictionary.d, len(dictionary))
        self.sum_loss = 0.0

    def update(self, x_BD: torch.Tensor) -> None:
        codes = self.dictionary.encode(x_BD, self.k, method=self.method)
        terms = recon_terms(x_BD, codes, self.dictionary.atoms.to(torch.float32))
        used = distinct_used(codes.indices.cpu(), codes.values.cpu())
        self.sums.add(x_BD, terms.x_sq, terms.err_sq, terms.cosine, codes.indices.cpu()[used])
        self.sum_loss += float(normalised_loss(terms.cosine.double(), self.dictionary.d).sum())

    def report(self) -> EvalReport:
        s = self.sums
        return EvalReport(
            tokens=s.n,
            k=self.k,
            fvu=s.fvu,
            mean_cosine=s.mean(s.sum_cos),
            normalised_loss=s.mean(self.sum_loss),
            l0=s.mean(s.sum_l0),
            n_atoms=len(self.dictionary),
            dead_atoms=int((s.usage == 0).sum()),
            usage=s.usage.clone(),
        )


def evaluate(
    dictionary: Dictionary, batches: Iterable[torch.Tensor], k: int | None = None, method: str = "mp"
) -> EvalReport:
    ev = Evaluator(dictionary, k, method)
    for x in batches:
        ev.update(x[0] if isinstance(x, tuple) else x)
    return ev.report()
