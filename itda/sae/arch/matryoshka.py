"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2025): BatchTopK whose latents form nested
prefixes (cfg.matryoshka_widths, increasing, the last = all latents). Each prefix reconstructs the input
on its own, from b_dec and the kept latents whose index is below its width; the loss is the sum of the
prefixes' FVUs (each squared error over the batch's total variance, as the FVU). Selection, threshold
and inference are BatchTopK's; exported to SAELens as `jumprelu`, as SAELens saves its own."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from itda.sae.arch.base import EncodedLike, SaeConfigLike, SaeLike
from itda.sae.arch.batchtopk import BatchTopK
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.kernels import fvu_scale


def prefix_fvus(
    sae: SaeLike,
    x_BD: Tensor,
    acts_BK: Tensor,
    idx_BK: Tensor,
    widths: tuple[int, ...],
    group: BatchGroup = SINGLE,
) -> list[Tensor]:
    """The FVU of each prefix (this rank's part of it): x_hat_w = b_dec + sum over kept latents i < w of
    acts_i W_dec[i]."""
    recon_BD = sae.b_dec.expand_as(x_BD)
    errs: list[Tensor] = []
    low = 0
    for w in widths:
        part_BK = torch.where((idx_BK >= low) & (idx_BK < w), acts_BK, torch.zeros_like(acts_BK))
        recon_BD = recon_BD + sae.decode(part_BK, idx_BK, bias=False)
        errs.append(x_BD - recon_BD)
        low = w
    unit, total_var = fvu_scale(x_BD, errs, group)  # exact; the squares cannot overflow float32
    return [(e * unit).pow(2).sum() / total_var for e in errs]


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"
    summary = "BatchTopK whose nested latent prefixes (--matryoshka-widths) each reconstruct the input"

    def config_error(self, cfg: SaeConfigLike) -> tuple[str, str] | None:
        w = cfg.matryoshka_widths
        if not w:
            return "matryoshka_widths", "must list the prefix widths (e.g. 256,512,1024) for arch matryoshka_batchtopk"
        if any(a >= b for a, b in zip(w, w[1:], strict=False)) or w[0] < 1 or w[-1] != cfg.n_latents:
            return "matryoshka_widths", f"must increase from >= 1 to the {cfg.n_latents} latents, got {list(w)}"
        return None

    def recon_loss(
        self, sae: SaeLike, x_BD: Tensor, enc: EncodedLike, fvu: Tensor, group: BatchGroup = SINGLE
    ) -> Tensor:
        """fvu (the full width) plus the FVU of every inner prefix."""
        inner = prefix_fvus(sae, x_BD, enc.top_acts, enc.top_indices, sae.cfg.matryoshka_widths[:-1], group)
        return fvu + torch.stack(inner).sum() if inner else fvu

    def training_details(self, sae: SaeLike) -> dict[str, Any]:
        return {"k": sae.cfg.k, "matryoshka_widths": list(sae.cfg.matryoshka_widths)}
