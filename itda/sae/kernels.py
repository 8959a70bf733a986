"""The selection kernels of the SAE architectures and the exact power-of-two loss unit (pure math).

Each selection returns the kept activations of a batch per row as [B, K] values and int64 latent
indices, padded with zeros to the batch's largest row count; decode sums them without a dense [B, F].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itda.sae.batchgroup import SINGLE, BatchGroup


def fvu_scale(x_BD: Tensor, errs: Sequence[Tensor], group: BatchGroup = SINGLE) -> tuple[float, Tensor]:
    """(unit, total_var) of a batch over every rank's rows: the pow2_unit of the centred rows and the
    errors, and sum ||(x - mean(x)) * unit||^2 (no gradient: it depends on x alone)."""
    centred_BD = x_BD - group.mean_rows(x_BD)
    unit = pow2_unit(centred_BD, *errs)
    if group.distributed:
        low = group.min_value(unit)
        unit = unit if low is None else low
    return unit, group.sum((centred_BD.detach() * unit).pow(2).sum())


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


def row_topk(pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row (TopK, Gao et al. 2024)."""
    acts_BK, idx_BK = pre_BF.topk(k, dim=1, sorted=False)
    return acts_BK, idx_BK


def _packed(pre_BF: Tensor, keep_BF: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of pre where keep holds, per row, zero-padded to the largest row count (>= 1)."""
    width = max(1, int(keep_BF.sum(1).max()))
    acts_BK, idx_BK = pre_BF.topk(width, dim=1)
    kept_BK = torch.gather(keep_BF, 1, idx_BK)
    return torch.where(kept_BK, acts_BK, torch.zeros_like(acts_BK)), idx_BK


def batch_topk(pre_BF: Tensor, k: int, group: BatchGroup = SINGLE) -> tuple[Tensor, Tensor]:
    """Keep the B*k largest entries of the batch (B: every rank's rows); per row as [B, K'] with K' the
    largest row count."""
    b = group.rows(pre_BF.shape[0])
    flat = pre_BF.reshape(-1)
    top = flat.topk(min(b * k, flat.numel()), sorted=False).values
    if group.distributed:  # the global cut: the (B*k)-th largest of every rank's candidates
        top = group.gather_rows(top.detach())
        top = top.topk(min(b * k, top.numel()), sorted=False).values
    return _packed(pre_BF, pre_BF >= top.min())


def jumprelu(pre_BF: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """JumpReLU with one threshold for every latent: keep pre where pre > threshold (pre >= 0, relu'd)."""
    return _packed(pre_BF, pre_BF > threshold)


def min_positive(acts_BK: Tensor) -> float | None:
    """The smallest positive kept activation of a batch (float64), or None when none is positive."""
    pos = acts_BK[acts_BK > 0]
    return float(pos.min().double()) if pos.numel() else None


class _KeptPre(torch.autograd.Function):
    """kept_BK (pre-activations relu(x W^T + b) at idx_BK, 0 where not kept), differentiable in x, W and b
    through the kept entries only: on CPU a sparse [F, B] x [B, D] product of B*K entries, not a dense GEMM."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_FD: Tensor, b_F: Tensor, kept_BK: Tensor, idx_BK: Tensor) -> Tensor:
        ctx.save_for_backward(x_BD, W_FD, kept_BK, idx_BK)
        return kept_BK.clone()

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x_BD, W_FD, kept_BK, idx_BK = ctx.saved_tensors
        g_BK = torch.where(kept_BK > 0, grads[0], torch.zeros_like(grads[0]))  # relu and the selection
        grad_x = grad_W = grad_b = None
        if g_BK.is_cuda:  # CUDA: the dense GEMMs, fast there and deterministic (scatters into sparse sums are not)
            return (*dense_encoder_grads(x_BD, W_FD, g_BK, idx_BK), None, None)
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.functional.embedding_bag(idx_BK, W_FD, per_sample_weights=g_BK, mode="sum")
        if ctx.needs_input_grad[1]:  # G^T x with G the [B, F] gradient of the pre-activations, sparse
            b, k = g_BK.shape
            rows_N = torch.arange(b, device=g_BK.device).repeat_interleave(k)
            g_FB = torch.sparse_coo_tensor(
                torch.stack([idx_BK.reshape(-1), rows_N]), g_BK.reshape(-1), (W_FD.shape[0], b), check_invariants=False
            )
            grad_W = torch.sparse.mm(g_FB, x_BD.detach())
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_FD.shape[0], dtype=g_BK.dtype, device=g_BK.device)
            grad_b.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def dense_encoder_grads(x_BD: Tensor, W_FD: Tensor, g_BK: Tensor, idx_BK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad W, grad b) of the pre-activations' gradient g_BK at idx_BK (distinct per row), scattered
    into a dense [B, F] matrix: what autograd's dense encoder backward computes."""
    g_BF = torch.zeros(g_BK.shape[0], W_FD.shape[0], dtype=g_BK.dtype, device=g_BK.device)
    g_BF.scatter_(1, idx_BK, g_BK)
    return g_BF @ W_FD, g_BF.T @ x_BD.detach(), g_BF.sum(0)


def kept_pre(x_BD: Tensor, W_FD: Tensor, b_F: Tensor, kept_BK: Tensor, idx_BK: Tensor) -> Tensor:
    """kept_BK as a function of the encoder's input x, W_FD and b_F (kept_BK: relu(x W^T + b) at idx_BK,
    computed without gradient, 0 where not kept); the backward touches only the kept entries."""
    out = _KeptPre.apply(x_BD, W_FD, b_F, kept_BK, idx_BK)
    assert isinstance(out, Tensor)
    return out
