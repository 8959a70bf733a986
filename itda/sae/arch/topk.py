"""Per-token TopK (Gao et al. 2024): every token keeps its k largest pre-activations, in training and
at inference; exported to SAELens as `topk`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from itda.sae.arch.base import Architecture, SaeLike
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.kernels import row_topk


class TopK(Architecture):
    name = "topk"
    summary = "per-token TopK: each token keeps its k largest latents"
    saelens_architecture = "topk"

    def select_train(self, sae: SaeLike, pre_BF: Tensor, group: BatchGroup = SINGLE) -> tuple[Tensor, Tensor]:
        return row_topk(pre_BF, sae.cfg.k)

    def select_infer(self, sae: SaeLike, pre_BF: Tensor, units: float) -> tuple[Tensor, Tensor]:
        return row_topk(pre_BF, sae.cfg.k)

    def saelens(self, sae: SaeLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
        return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}, {}, {}
