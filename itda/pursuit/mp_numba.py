"""Matching pursuit and batch-OMP in numba: parallel over rows, no per-step Python.

Each row's correlation vector (N float32) stays in cache while the k steps update it with
rows of the precomputed Gram matrix. The initial correlations come from one GEMM done by the
caller (torch), which is already optimal.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from itda.pursuit.jit import njit_cached

_FASTMATH = {"nnan", "ninf", "nsz", "contract"}
_ABS_MASK = np.int32(0x7FFFFFFF)
_BLOCK = 64


# |c| is compared through the bit pattern: for finite float32, clearing the sign bit and
# comparing as int32 orders values like |c| does, and integer max reductions vectorise.
@numba.njit(inline="always", fastmath=_FASTMATH)
def _max_abs_bits(c_bits):
    m = np.int32(0)
    for i in range(c_bits.shape[0]):
        v = c_bits[i] & _ABS_MASK
        m = v if v > m else m
    return m


@numba.njit(inline="always", fastmath=_FASTMATH)
def _first_index_of(c_bits, m):
    n = c_bits.shape[0]
    n_full = n - n % _BLOCK
    for base in range(0, n_full, _BLOCK):
        hit = False
        for lane in range(_BLOCK):
            hit |= (c_bits[base + lane] & _ABS_MASK) == m
        if hit:
            for lane in range(_BLOCK):
                if (c_bits[base + lane] & _ABS_MASK) == m:
                    return base + lane
    for i in range(n_full, n):
        if (c_bits[i] & _ABS_MASK) == m:
            return i
    return 0


@numba.njit(inline="always", fastmath=_FASTMATH)
def _argmax_abs(c):
    bits = c.view(np.int32)
    return _first_index_of(bits, _max_abs_bits(bits))


@njit_cached(parallel=True, fastmath=_FASTMATH)
def mp_gram_kernel(corr_BN, gram_NN, k, stop_B, idx_BK, val_BK):
    """In-place MP over correlation rows corr_BN (C-contiguous float32, overwritten).

    Row b stops once its steps have removed stop_B[b] (float64) of its energy (sum of the
    squared coefficients; a finite value above any energy for no stop, as fastmath assumes no inf): its
    later slots hold index -1 and value 0.
    """
    b_total, n = corr_BN.shape
    for b in numba.prange(b_total):
        c = corr_BN[b]
        bits = c.view(np.int32)
        j = _first_index_of(bits, _max_abs_bits(bits))
        removed = 0.0
        for t in range(k):
            a = c[j]
            idx_BK[b, t] = j
            val_BK[b, t] = a
            removed += np.float64(a) * np.float64(a)
            if removed >= stop_B[b]:
                for s in range(t + 1, k):
                    idx_BK[b, s] = -1
                    val_BK[b, s] = 0.0
                break
            if t + 1 < k:
                g = gram_NN[j]
                m = np.int32(0)
                for i in range(n):
                    c[i] -= a * g[i]
                    v = bits[i] & _ABS_MASK
                    m = v if v > m else m
                j = _first_index_of(bits, m)


@numba.njit(inline="always", fastmath=_FASTMATH)
def _update_max(c, bits, g, a, lo, hi, m):
    """c[lo:hi] -= a * g[lo:hi]; the largest |c| bits of that range and m."""
    for i in range(lo, hi):
        c[i] -= a * g[i]
        v = bits[i] & _ABS_MASK
        m = v if v > m else m
    return m


@numba.njit(inline="always", fastmath=_FASTMATH)
def _pick_excluding(bits, m, own):
    """First index with |c| bits m other than own (own holds 0, so it can tie only when m is 0); -1 if none."""
    j = _first_index_of(bits, m)
    if j != own:
        return j
    for i in range(own + 1, bits.shape[0]):
        if (bits[i] & _ABS_MASK) == m:
            return i
    return -1


@njit_cached(parallel=True, fastmath=_FASTMATH)
def mp_gram_excluding_kernel(corr_BN, gram_NN, k, own_B, idx_BK, val_BK):
    """mp_gram_kernel where row b never selects atom own_B[b] (-1: any atom may be selected).

    That atom's correlation is held at 0 and skipped by the updates, so the other atoms' follow
    MP over the dictionary without it exactly; a row left with no atom gets index -1, value 0.
    """
    b_total, n = corr_BN.shape
    for b in numba.prange(b_total):
        c = corr_BN[b]
        bits = c.view(np.int32)
        own = own_B[b]
        hi = own if own >= 0 else n  # the updates run over [0, hi) and (own, n)
        if own >= 0:
            c[own] = 0.0
        j = _pick_excluding(bits, _max_abs_bits(bits), own)
        for t in range(k):
            if j < 0:
                idx_BK[b, t] = -1
                val_BK[b, t] = 0.0
                continue
            a = c[j]
            idx_BK[b, t] = j
            val_BK[b, t] = a
            if t + 1 < k:
                g = gram_NN[j]
                m = _update_max(c, bits, g, a, 0, hi, np.int32(0))
                if own >= 0:
                    m = _update_max(c, bits, g, a, own + 1, n, m)
                j = _pick_excluding(bits, m, own)


@njit_cached(parallel=True, fastmath=_FASTMATH)
def omp_gram_kernel(alpha0_BN, gram_NN, k, eps, idx_BK, gamma_BK, energy_drop_B):
    """Batch-OMP (Rubinstein, Zibulevsky & Elad 2008) with incremental Cholesky, per row.

    energy_drop_B receives alpha0[I] . gamma, so ||r||^2 = ||x||^2 - energy_drop.
    """
    b_total, n = alpha0_BN.shape
    for b in numba.prange(b_total):
        alpha0 = alpha0_BN[b]
        c = alpha0.copy()
        chol = np.zeros((k, k), dtype=np.float64)
        sel = np.empty(k, dtype=np.int64)
        gamma = np.zeros(k, dtype=np.float64)
        tmp = np.zeros(k, dtype=np.float64)
        n_sel = 0
        for t in range(k):
            j = _argmax_abs(c)
            if t == 0:
                chol[0, 0] = 1.0
            else:
                # solve chol[:t,:t] w = G[sel, j]
                for r in range(t):
                    acc = np.float64(gram_NN[sel[r], j])
                    for s in range(r):
                        acc -= chol[r, s] * chol[t, s]
                    chol[t, r] = acc / chol[r, r]
                diag = 1.0
                for s in range(t):
                    diag -= chol[t, s] * chol[t, s]
                if diag <= eps:
                    break
                chol[t, t] = math.sqrt(diag)
            sel[t] = j
            n_sel = t + 1
            # gamma = (L L^T)^-1 alpha0[sel]
            for r in range(n_sel):
                acc = np.float64(alpha0[sel[r]])
                for s in range(r):
                    acc -= chol[r, s] * tmp[s]
                tmp[r] = acc / chol[r, r]
            for r in range(n_sel - 1, -1, -1):
                acc = tmp[r]
                for s in range(r + 1, n_sel):
                    acc -= chol[s, r] * gamma[s]
                gamma[r] = acc / chol[r, r]
            if n_sel == k:
                break
            for i in range(n):
                c[i] = alpha0[i]
            for s in range(n_sel):
                g = gram_NN[sel[s]]
                coef = np.float32(gamma[s])
                for i in range(n):
                    c[i] -= coef * g[i]
            for s in range(n_sel):
                c[sel[s]] = 0.0
        drop = 0.0
        for s in range(n_sel):
            idx_BK[b, s] = sel[s]
            gamma_BK[b, s] = gamma[s]
            drop += alpha0[sel[s]] * gamma[s]
        for s in range(n_sel, k):
            idx_BK[b, s] = -1
            gamma_BK[b, s] = 0.0
        energy_drop_B[b] = drop
