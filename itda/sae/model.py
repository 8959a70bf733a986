"""The sparse autoencoder of every architecture (itda.sae.arch: topk, batchtopk, matryoshka_batchtopk).

encode: pre = relu(W_enc (x - b_dec) + b_enc), then the architecture keeps some latents (in training:
the k largest per row, or the B*k largest of the batch; at inference: TopK per row, or JumpReLU with the
learned `threshold`); decode: x_hat = sum_i a_i W_dec[i] + b_dec, with unit-norm decoder rows. Weights
are stored as sparsify does: W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D]; `threshold` is a float64
scalar buffer (used by the architectures that learn one, 0 otherwise).

The losses square their terms after an exact power-of-two rescaling (pow2_unit): bit for bit
the plain formula on ordinary activations, finite at 1e30 or 1e-30 where plain float32 squares
overflow or vanish. activation_units and scale_biases_ let training and evaluation work on
activations of any finite size in units where float32 is comfortable, exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itda.sae.arch import Architecture, get_arch
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.kernels import batch_topk, fvu_scale, kept_pre  # noqa: F401  (batch_topk: re-exported)


@dataclass(frozen=True)
class SaeConfig:
    d_in: int
    n_latents: int
    k: int = 32  # per token (topk) or on average over a training batch (batchtopk, matryoshka_batchtopk)
    arch: str = "topk"  # an itda.sae.arch name
    matryoshka_widths: tuple[int, ...] = ()  # matryoshka_batchtopk: increasing prefix widths, the last = n_latents

    def to_dict(self) -> dict:
        out: dict = {"d_in": self.d_in, "n_latents": self.n_latents, "k": self.k, "arch": self.arch}
        if self.matryoshka_widths:
            out["matryoshka_widths"] = list(self.matryoshka_widths)
        return out


class EncoderOutput(NamedTuple):
    top_acts: Tensor  # [B, K] activations of the kept latents (0 in padding slots)
    top_indices: Tensor  # [B, K] int64 latent indices
    pre_acts: Tensor  # [B, F] relu(W_enc (x - b_dec) + b_enc) (training: without gradient)
    sae_in: Tensor | None = None  # training: x - b_dec, what kept_pre differentiates through


class ForwardOutput(NamedTuple):
    sae_out: Tensor  # [B, D] reconstruction
    top_acts: Tensor  # [B, K]
    top_indices: Tensor  # [B, K]
    fvu: Tensor  # scalar: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    auxk_loss: Tensor  # scalar: AuxK term (0 without dead latents)
    recon_loss: Tensor  # scalar: the architecture's reconstruction loss (the FVU, or the prefixes' FVU sum)


UNITS_RANGE = (2.0**-32, 2.0**32)  # RMS row norms that float32 training and evaluation take as they are


def activation_units(x_SD: Tensor) -> float:
    """1.0 when the rows' RMS norm (float64) is in UNITS_RANGE; else the power of two nearest it.

    Working on x / units is exact (a power of two), and `TopKSAE.scale_biases_(units)` turns an
    SAE for x / units into the same SAE for x; the exponent is clamped to float32's [-126, 126].
    """
    if not x_SD.numel():
        return 1.0
    rms = float(x_SD.detach().double().pow(2).sum(-1).mean().sqrt())
    if rms == 0.0 or not math.isfinite(rms) or UNITS_RANGE[0] <= rms <= UNITS_RANGE[1]:
        return 1.0
    return math.ldexp(1.0, min(max(round(math.log2(rms)), -126), 126))


class TopKSAE(nn.Module):
    """The SAE module of every architecture (the name is historical: cfg.arch picks the selection rules)."""

    threshold: Tensor

    def __init__(self, cfg: SaeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.arch: Architecture = get_arch(cfg.arch)
        D, Fn = cfg.d_in, cfg.n_latents
        self.W_enc = nn.Parameter(torch.zeros(Fn, D, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(Fn, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(Fn, D, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(D, device=device, dtype=dtype))
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float64))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def inference_threshold(self) -> float:
        """The JumpReLU threshold as inference uses and SAELens stores it: float32."""
        return float(self.threshold.to(torch.float32))

    def pre_acts(self, x_BD: Tensor, units: float = 1.0) -> Tensor:
        """relu(W_enc (x - b_dec) + b_enc); with `units` (a power of two) that of x / units, in those units."""
        if units == 1.0:
            return F.relu(F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc))
        s = 1.0 / units
        return F.relu(F.linear(x_BD * s - self.b_dec * s, self.W_enc, self.b_enc * s))

    def encode(
        self, x_BD: Tensor, *, training: bool | None = None, units: float = 1.0, group: BatchGroup = SINGLE
    ) -> EncoderOutput:
        """The architecture's training selection when `training` (default: self.training; over every rank's
        rows of `group`), else its inference rule; acts in `units`."""
        if (self.training if training is None else training) and units == 1.0:
            sae_in_BD = x_BD - self.b_dec
            with torch.no_grad():
                pre_BF = F.relu(F.linear(sae_in_BD, self.W_enc, self.b_enc))
                kept, idx = self.arch.select_train(self, pre_BF, group)
            # the gradient reaches the encoder through the kept entries only (sparse, exact)
            acts = kept_pre(sae_in_BD, self.W_enc, self.b_enc, kept, idx)
            return EncoderOutput(acts, idx, pre_BF, sae_in_BD)
        pre_BF = self.pre_acts(x_BD, units)
        if self.training if training is None else training:
            acts, idx = self.arch.select_train(self, pre_BF, group)
        else:
            acts, idx = self.arch.select_infer(self, pre_BF, units)
        return EncoderOutput(acts, idx, pre_BF)

    def decode(self, top_acts: Tensor, top_indices: Tensor, *, bias: bool = True, units: float = 1.0) -> Tensor:
        """sum_i top_acts[:, i] W_dec[top_indices[:, i]] (+ b_dec / units), without a dense [B, F] matrix."""
        out = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts.to(self.W_dec.dtype), mode="sum")
        if not bias:
            return out
        return out + (self.b_dec if units == 1.0 else self.b_dec * (1.0 / units))

    def reconstruct(self, x_BD: Tensor, k: int | None = None) -> Tensor:
        """x_hat for evaluation and splicing, by the inference rule (k is ignored: the SAE's own rule)."""
        enc = self.encode(x_BD.to(self.W_enc.dtype), training=False)
        return self.decode(enc.top_acts, enc.top_indices)

    def forward(
        self,
        x_BD: Tensor,
        dead_mask_F: Tensor | None = None,
        k_aux: int | None = None,
        group: BatchGroup = SINGLE,
    ) -> ForwardOutput:
        """The training forward; with a `group` of ranks, x is this rank's shard and the losses are its
        parts of the global batch's (their sum over ranks is the loss of the whole batch)."""
        enc = self.encode(x_BD, group=group)
        sae_out = self.decode(enc.top_acts, enc.top_indices)
        err_BD = x_BD - sae_out
        unit, total_var = fvu_scale(x_BD, [err_BD], group)  # the squares below cannot overflow float32
        fvu = (err_BD * unit).pow(2).sum() / total_var
        auxk = auxk_loss(self, enc, err_BD, total_var, dead_mask_F, k_aux, unit)
        recon = self.arch.recon_loss(self, x_BD, enc, fvu, group)
        return ForwardOutput(sae_out, enc.top_acts, enc.top_indices, fvu, auxk, recon)

    @torch.no_grad()
    def scale_biases_(self, factor: float) -> None:
        """Make this the same SAE for activations times `factor` > 0: b_enc, b_dec and the threshold scale;
        W_enc, W_dec are unitless.

        relu, TopK and JumpReLU commute with a positive scale, so the new SAE's codes and reconstruction
        are the old ones times factor (exactly, for a power of two).
        """
        self.b_enc.mul_(factor)
        self.b_dec.mul_(factor)
        self.threshold.mul_(factor)

    # -- decoder constraints -----------------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self) -> None:
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp(min=torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        along = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(along * self.W_dec)


def auxk_loss(
    sae: TopKSAE,
    enc: EncoderOutput,
    err_BD: Tensor,
    total_var: Tensor,
    dead_mask_F: Tensor | None,
    k_aux: int | None,
    unit: float = 1.0,
) -> Tensor:
    """AuxK (Gao et al. 2024, App. B.1): reconstruct the residual from the top k_aux dead latents.

    loss = min(n_dead / k_aux, 1) * ||e - e_hat||^2 / sum ||x - mean(x)||^2, e_hat decoded
    without b_dec; k_aux defaults to d_in / 2. Both squares are taken of the terms times `unit`
    (total_var = sum ||(x - mean(x)) * unit||^2), a power of two that keeps them in range.
    """
    pre_BF = enc.pre_acts
    if dead_mask_F is None:
        return pre_BF.new_zeros(())
    n_dead = int(dead_mask_F.sum())
    if n_dead == 0:
        return pre_BF.new_zeros(())
    k_aux = k_aux or max(1, sae.cfg.d_in // 2)
    scale = min(n_dead / k_aux, 1.0)
    masked = torch.where(dead_mask_F[None], pre_BF, torch.full_like(pre_BF, -torch.inf))
    acts, idx = masked.topk(min(k_aux, n_dead), dim=1, sorted=False)
    acts = acts.clamp(min=0)  # dead latents all -inf would not happen: n_dead >= width
    if enc.sae_in is not None:  # training's sparse path: the encoder's gradient through these entries
        acts = kept_pre(enc.sae_in, sae.W_enc, sae.b_enc, acts.detach(), idx)
    e_hat = sae.decode(acts, idx, bias=False)
    return scale * ((e_hat - err_BD.detach()) * unit).pow(2).sum() / total_var
