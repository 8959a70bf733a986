"""BatchTopK (Bussmann et al. 2024): a training batch of B tokens keeps its B*k largest pre-activations,
and the inference threshold is learned meanwhile as SAELens and dictionary_learning do: an exponential
moving average (rate TrainConfig.threshold_lr, from 0) of the smallest positive kept activation of each
batch, in float64. Inference is JumpReLU with that threshold for every latent (a token keeps the latents
whose pre-activation exceeds it: its L0 varies, any batch size gives the same codes); exported to SAELens
as `jumprelu` with `threshold` [F], as SAELens saves its own BatchTopK SAEs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from itda.sae.arch.base import Architecture, SaeLike
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.kernels import batch_topk, jumprelu, min_positive


def ema_threshold(threshold: float, acts_BK: Tensor, rate: float, group: BatchGroup = SINGLE) -> float:
    """(1 - rate) * threshold + rate * (smallest positive kept activation of every rank); unchanged when none
    is positive."""
    low = group.min_value(min_positive(acts_BK))
    return threshold if low is None else (1.0 - rate) * threshold + rate * low


class BatchTopK(Architecture):
    name = "batchtopk"
    summary = "BatchTopK in training (B*k latents per batch), JumpReLU with the learned threshold at inference"
    uses_threshold = True
    saelens_architecture = "jumprelu"

    def select_train(self, sae: SaeLike, pre_BF: Tensor, group: BatchGroup = SINGLE) -> tuple[Tensor, Tensor]:
        return batch_topk(pre_BF, sae.cfg.k, group)

    def select_infer(self, sae: SaeLike, pre_BF: Tensor, units: float) -> tuple[Tensor, Tensor]:
        return jumprelu(pre_BF, sae.inference_threshold() / units)

    @torch.no_grad()
    def after_forward(self, sae: SaeLike, acts_BK: Tensor, rate: float, group: BatchGroup = SINGLE) -> None:
        sae.threshold.fill_(ema_threshold(float(sae.threshold), acts_BK, rate, group))

    def training_details(self, sae: SaeLike) -> dict[str, Any]:
        return {"k": sae.cfg.k}

    def saelens(self, sae: SaeLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
        threshold_F = torch.full((sae.cfg.n_latents,), sae.inference_threshold(), dtype=torch.float32)
        meta = {"training_architecture": self.name, "training_architecture_details": self.training_details(sae)}
        return {}, {"threshold": threshold_F}, meta
