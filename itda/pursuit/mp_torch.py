"""Matching pursuit in torch (CPU and CUDA), one chunk of rows at a time.

Both kernels start from one GEMM of correlations c = x A^T and then update c in place,
c -= alpha * G[j], never re-multiplying by the whole dictionary when the Gram matrix G is
given. Without G (it does not fit in memory) a step computes the Gram rows of the distinct
atoms picked at that step, or recomputes correlations from the residual when most picks
differ: never more than one [B, d] x [d, N] product per step.
"""

from __future__ import annotations

import torch

from itda.pursuit.codes import SparseCodes


def mp_chunk_torch(
    x_BD: torch.Tensor,
    atoms_ND: torch.Tensor,
    k: int,
    gram_NN: torch.Tensor | None,
    exclude_B: torch.Tensor | None = None,
    stop_B: torch.Tensor | None = None,
) -> SparseCodes:
    """Textbook MP of float32 rows x over float32 unit atoms; see module docstring.

    exclude_B (int64 [B], -1: none): atom row b never selects; a row left with no atom gets
    index -1 and value 0. stop_B (float64 [B]): row b stops once its squared coefficients add up
    to stop_B[b]; its later slots hold index -1 and value 0 (the rows still run in the batch's
    steps, so this saves no time here: the numba kernel skips them).
    """
    b = x_BD.shape[0]
    corr_BN = x_BD @ atoms_ND.T
    abs_BN = torch.empty_like(corr_BN)
    idx_BK = torch.empty(b, k, dtype=torch.int64, device=x_BD.device)
    val_BK = torch.empty(b, k, dtype=torch.float32, device=x_BD.device)
    rows_B = torch.arange(b, device=x_BD.device)
    held_H, own_H = _held(exclude_B)
    resid_BD = x_BD.clone() if gram_NN is None else None
    removed_B = None if stop_B is None else torch.zeros(b, dtype=torch.float64, device=x_BD.device)
    for t in range(k):
        torch.abs(corr_BN, out=abs_BN)
        if own_H is not None:
            abs_BN[held_H, own_H] = -1.0  # below every |c|: chosen only when no other atom exists
        j_B = abs_BN.argmax(dim=1)
        alpha_B = corr_BN[rows_B, j_B]
        if own_H is not None:
            alone_H = j_B[held_H] == own_H
            j_B[held_H[alone_H]] = -1
            alpha_B[held_H[alone_H]] = 0.0
        if (
            removed_B is not None and stop_B is not None
        ):  # squared coefficients summed in float64 in step order, as numba does
            stopped_B = removed_B >= stop_B
            j_B = torch.where(stopped_B, -1, j_B)
            alpha_B = torch.where(stopped_B, 0.0, alpha_B)
            removed_B += alpha_B.double() ** 2
        idx_BK[:, t] = j_B
        val_BK[:, t] = alpha_B
        if t + 1 == k:
            break
        _step(corr_BN, resid_BD, atoms_ND, gram_NN, j_B.clamp(min=0), alpha_B)
    energy_B = (x_BD * x_BD).sum(1) - (val_BK * val_BK).sum(1)
    return SparseCodes(idx_BK, val_BK, energy_B.clamp_(min=0.0))


def _held(exclude_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows with an excluded atom [H], their excluded atoms [H]); (empty, None) when none."""
    if exclude_B is None:
        return torch.empty(0, dtype=torch.int64), None
    held_H = torch.nonzero(exclude_B >= 0).flatten()
    if not len(held_H):
        return held_H, None
    return held_H, exclude_B[held_H]


def _step(
    corr_BN: torch.Tensor,
    resid_BD: torch.Tensor | None,
    atoms_ND: torch.Tensor,
    gram_NN: torch.Tensor | None,
    j_B: torch.Tensor,
    alpha_B: torch.Tensor,
) -> None:
    """Subtract alpha_B times atom j_B from every row's correlations (and residual, Gram-free)."""
    b = corr_BN.shape[0]
    if gram_NN is not None:
        corr_BN.addcmul_(gram_NN.index_select(0, j_B), alpha_B[:, None], value=-1.0)
        return
    assert resid_BD is not None  # the Gram-free path keeps the residual
    resid_BD.addcmul_(atoms_ND.index_select(0, j_B), alpha_B[:, None], value=-1.0)
    uniq_U, inverse_B = torch.unique(j_B, return_inverse=True)
    if 2 * uniq_U.shape[0] < b:
        rows_UN = atoms_ND.index_select(0, uniq_U) @ atoms_ND.T
        corr_BN.addcmul_(rows_UN.index_select(0, inverse_B), alpha_B[:, None], value=-1.0)
    else:
        torch.matmul(resid_BD, atoms_ND.T, out=corr_BN)


def omp_chunk_torch(
    x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int, gram_NN: torch.Tensor | None, eps: float = 1e-6
) -> SparseCodes:
    """Batch-OMP with an incremental Cholesky factor of G[I, I] per row.

    Residual correlations are c = alpha0 - G[:, I] gamma with gamma the least-squares
    coefficients on the chosen set I. Without a Gram matrix the residual is formed explicitly
    and correlated with the dictionary (one GEMM per step). A row stops early (index -1)
    when the next atom is linearly dependent on the chosen ones.
    """
    b = x_BD.shape[0]
    dev = x_BD.device
    alpha0_BN = x_BD @ atoms_ND.T
    corr_BN = alpha0_BN.clone()
    chol_BKK = torch.zeros(b, k, k, dtype=torch.float32, device=dev)
    idx_BK = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    gamma_BK = torch.zeros(b, k, dtype=torch.float32, device=dev)
    alive_B = torch.ones(b, dtype=torch.bool, device=dev)
    for t in range(k):
        j_B = corr_BN.abs().argmax(dim=1)
        if t == 0:
            chol_BKK[:, 0, 0] = 1.0
        else:
            prev_BT = idx_BK[:, :t].clamp(min=0)
            cross_BT = (atoms_ND[prev_BT] @ atoms_ND[j_B].unsqueeze(-1)).squeeze(-1)
            w_BT = torch.linalg.solve_triangular(chol_BKK[:, :t, :t], cross_BT.unsqueeze(-1), upper=False).squeeze(-1)
            diag_B = 1.0 - (w_BT * w_BT).sum(1)
            alive_B &= diag_B > eps
            chol_BKK[:, t, :t] = torch.where(alive_B[:, None], w_BT, 0.0)
            chol_BKK[:, t, t] = torch.where(alive_B, diag_B.clamp(min=eps).sqrt(), 1.0)
        idx_BK[:, t] = torch.where(alive_B, j_B, -1)
        if not bool(alive_B.any()):
            break
        sel_BT = idx_BK[:, : t + 1]
        rhs_BT = torch.where(sel_BT >= 0, alpha0_BN.gather(1, sel_BT.clamp(min=0)), 0.0)
        gamma_BT = torch.cholesky_solve(rhs_BT.unsqueeze(-1), chol_BKK[:, : t + 1, : t + 1]).squeeze(-1)
        gamma_BT = torch.where(sel_BT >= 0, gamma_BT, 0.0)
        gamma_BK[:, : t + 1] = gamma_BT
        if t + 1 == k:
            break
        if gram_NN is not None:
            corr_BN.copy_(alpha0_BN)
            for s in range(t + 1):
                corr_BN.addcmul_(gram_NN.index_select(0, sel_BT[:, s].clamp(min=0)), gamma_BT[:, s, None], value=-1.0)
        else:
            recon_BD = torch.einsum("bt,btd->bd", gamma_BT, atoms_ND[sel_BT.clamp(min=0)])
            corr_BN = (x_BD - recon_BD) @ atoms_ND.T
        # chosen atoms have zero residual correlation; pin them so they are never re-picked
        corr_BN.scatter_(1, sel_BT.clamp(min=0), 0.0)
        corr_BN[~alive_B] = 0.0
    valid_BK = idx_BK >= 0
    alpha_sel_BK = torch.where(valid_BK, alpha0_BN.gather(1, idx_BK.clamp(min=0)), 0.0)
    energy_B = (x_BD * x_BD).sum(1) - (alpha_sel_BK * gamma_BK).sum(1)
    return SparseCodes(idx_BK, torch.where(valid_BK, gamma_BK, 0.0), energy_B.clamp_(min=0.0))
