"""An SAE (itda.sae.LoadedSae) as the ModelCoder that evaluation on a model takes (itda.evaluation.coder)."""

from __future__ import annotations

import torch

from itda.evaluation.coder import as_coder
from itda.sae.evaluate import SaeEvaluator
from itda.sae.io import LoadedSae


class SaeCoder:
    """A loaded SAE as a ModelCoder: its own k, its recorded hookpoint and tokenizer."""

    what = "SAE"

    def __init__(self, loaded: LoadedSae):
        self.sae, self.meta = loaded.sae, loaded.meta
        self.d = loaded.sae.cfg.d_in
        self.include_special = bool(loaded.meta.include_special)

    def evaluator(self) -> SaeEvaluator:
        return SaeEvaluator(self.sae)

    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return self.sae.reconstruct(x, k)


@as_coder.register
def _(obj: LoadedSae, k: int | None = None, method: str = "mp") -> SaeCoder:
    return SaeCoder(obj)
