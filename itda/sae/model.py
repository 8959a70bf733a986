"""TopK sparse autoencoder (Gao et al. 2024), with BatchTopK as a training option (pure math).

encode: pre = relu(W_enc (x - b_dec) + b_enc), keep the k largest per row (TopK) or the
B*k largest of the batch (BatchTopK); decode: x_hat = sum_i a_i W_dec[i] + b_dec, with unit-norm
decoder rows. Weights are stored as sparsify does: W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D].

The losses square their terms after an exact power-of-two rescaling (pow2_unit): bit for bit
the plain formula on ordinary activations, finite at 1e30 or 1e-30 where plain float32 squares
overflow or vanish. activation_units and scale_biases_ let training and evaluation work on
activations of any finite size in units where float32 is comfortable, exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SaeConfig:
    d_in: int
    n_latents: int
    k: int = 32
    batch_topk: bool = False  # training only: keep the B*k largest activations of the batch

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderOutput(NamedTuple):
    top_acts: Tensor  # [B, K] activations of the kept latents (0 in padding slots)
    top_indices: Tensor  # [B, K] int64 latent indices
    pre_acts: Tensor  # [B, F] relu(W_enc (x - b_dec) + b_enc)


class ForwardOutput(NamedTuple):
    sae_out: Tensor  # [B, D] reconstruction
    top_acts: Tensor  # [B, K]
    top_indices: Tensor  # [B, K]
    fvu: Tensor  # scalar: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    auxk_loss: Tensor  # scalar: AuxK term (0 without dead latents)


def pow2_unit(*tensors: Tensor) -> float:
    """2^-e with the largest |entry| of the tensors in [2^(e-1), 2^e), e clamped to [-126, 126].

    Multiplying by it is exact and brings every entry below 1 (below 4 past 2^126), so sums of
    their squares cannot overflow float32 for any finite input; 1.0 when all entries are zero.
    """
    tops = [t.detach().abs().amax() for t in tensors if t.numel()]
    top = float(torch.stack(tops).max()) if tops else 0.0  # one device sync
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    return math.ldexp(1.0, -min(max(math.frexp(top)[1], -126), 126))


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


def batch_topk(pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep the B*k largest entries of the batch; per row as [B, K'] with K' the largest row count."""
    b = pre_BF.shape[0]
    flat = pre_BF.reshape(-1)
    kth = flat.topk(min(b * k, flat.numel()), sorted=False).values.min()
    counts_B = (pre_BF >= kth).sum(1)
    width = max(1, int(counts_B.max()))
    acts_BK, idx_BK = pre_BF.topk(width, dim=1)
    acts_BK = torch.where(acts_BK >= kth, acts_BK, torch.zeros_like(acts_BK))
    return acts_BK, idx_BK


class TopKSAE(nn.Module):
    def __init__(self, cfg: SaeConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        D, Fn = cfg.d_in, cfg.n_latents
        self.W_enc = nn.Parameter(torch.zeros(Fn, D, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(Fn, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(Fn, D, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(D, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def pre_acts(self, x_BD: Tensor, units: float = 1.0) -> Tensor:
        """relu(W_enc (x - b_dec) + b_enc); with `units` (a power of two) that of x / units, in those units."""
        if units == 1.0:
            return F.relu(F.linear(x_BD - self.b_dec, self.W_enc, self.b_enc))
        s = 1.0 / units
        return F.relu(F.linear(x_BD * s - self.b_dec * s, self.W_enc, self.b_enc * s))

    def encode(self, x_BD: Tensor, *, batch: bool | None = None, units: float = 1.0) -> EncoderOutput:
        """TopK per row; BatchTopK when `batch` (default: cfg.batch_topk while training); acts in `units`."""
        pre_BF = self.pre_acts(x_BD, units)
        use_batch = (self.cfg.batch_topk and self.training) if batch is None else batch
        if use_batch:
            acts, idx = batch_topk(pre_BF, self.cfg.k)
        else:
            acts, idx = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
        return EncoderOutput(acts, idx, pre_BF)

    def decode(self, top_acts: Tensor, top_indices: Tensor, *, bias: bool = True, units: float = 1.0) -> Tensor:
        """sum_i top_acts[:, i] W_dec[top_indices[:, i]] (+ b_dec / units), without a dense [B, F] matrix."""
        out = F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts.to(self.W_dec.dtype), mode="sum")
        if not bias:
            return out
        return out + (self.b_dec if units == 1.0 else self.b_dec * (1.0 / units))

    def reconstruct(self, x_BD: Tensor, k: int | None = None) -> Tensor:
        """x_hat for evaluation and splicing (always per-row TopK; k is ignored: the SAE's own k)."""
        enc = self.encode(x_BD.to(self.W_enc.dtype), batch=False)
        return self.decode(enc.top_acts, enc.top_indices)

    def forward(self, x_BD: Tensor, dead_mask_F: Tensor | None = None, k_aux: int | None = None) -> ForwardOutput:
        enc = self.encode(x_BD)
        sae_out = self.decode(enc.top_acts, enc.top_indices)
        err_BD = x_BD - sae_out
        centred_BD = x_BD - x_BD.mean(0)
        unit = pow2_unit(centred_BD, err_BD)  # the squares below cannot overflow float32
        total_var = (centred_BD * unit).pow(2).sum()
        fvu = (err_BD * unit).pow(2).sum() / total_var
        auxk = auxk_loss(self, enc.pre_acts, err_BD, total_var, dead_mask_F, k_aux, unit)
        return ForwardOutput(sae_out, enc.top_acts, enc.top_indices, fvu, auxk)

    @torch.no_grad()
    def scale_biases_(self, factor: float) -> None:
        """Make this the same SAE for activations times `factor` > 0: b_enc, b_dec scale; W_enc, W_dec are unitless.

        relu and TopK commute with a positive scale, so the new SAE's codes and reconstruction
        are the old ones times factor (exactly, for a power of two).
        """
        self.b_enc.mul_(factor)
        self.b_dec.mul_(factor)

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
    pre_BF: Tensor,
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
    e_hat = sae.decode(acts, idx, bias=False)
    return scale * ((e_hat - err_BD.detach()) * unit).pow(2).sum() / total_var
