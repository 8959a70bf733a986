"""Public pursuit functions: validation, backend choice and chunking over rows."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from itda.errors import ItdaInputError
from itda.pursuit.codes import SparseCodes, cat_codes
from itda.pursuit.gram import compute_gram, gram_fits
from itda.resources import check_fits

DEFAULT_K = 40  # matching-pursuit steps per activation (the paper's k); every other default k is this one

Backend = Literal["auto", "torch", "numba"]
BACKENDS = ("auto", "torch", "numba")
CHUNK_BYTES = 256 << 20
NEVER = float(np.finfo(np.float64).max)  # a stop energy no row reaches (finite: the numba kernels assume no inf)


def _check_inputs(x: torch.Tensor, atoms: torch.Tensor, k: int, check_finite: bool = True) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(atoms, torch.Tensor):
        raise ItdaInputError("x and atoms must be torch tensors")
    if x.ndim != 2:
        raise ItdaInputError(f"activations must be 2-D [tokens, d], got shape {tuple(x.shape)}")
    if atoms.ndim != 2:
        raise ItdaInputError(f"atoms must be 2-D [atoms, d], got shape {tuple(atoms.shape)}")
    if x.shape[1] != atoms.shape[1]:
        raise ItdaInputError(f"dimension mismatch: activations have d={x.shape[1]}, atoms d={atoms.shape[1]}")
    if not x.is_floating_point() or not atoms.is_floating_point():
        raise ItdaInputError(f"activations and atoms must be floating point, got {x.dtype} and {atoms.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ItdaInputError(f"k must be an integer >= 1, got {k!r}")
    if atoms.shape[0] == 0:
        raise ItdaInputError("the dictionary has no atoms")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ItdaInputError("activations contain NaN or inf")


def gram_is_cheaper(b: int, n: int, d: int, k: int) -> bool:
    """Whether computing the Gram matrix beats the Gram-free path, by multiply-adds.

    With the Gram: n^2 d (the Gram) + b n d (first correlations) + k b n (row updates).
    Without: b n d + k u n d, computing a Gram row for each of the u <= min(b, n) distinct
    atoms picked per step (u = min(b, n) as the bound).
    """
    return n * n * d + k * b * n <= k * min(b, n) * n * d


def _resolve(
    x: torch.Tensor,
    atoms: torch.Tensor,
    gram: torch.Tensor | None,
    backend: str,
    need_gram_for_numba: bool = True,
    k: int = DEFAULT_K,
) -> tuple[str, torch.Tensor | None]:
    if backend not in BACKENDS:
        raise ItdaInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    n = atoms.shape[0]
    on_cuda = atoms.device.type == "cuda"
    if gram is not None and tuple(gram.shape) != (n, n):
        raise ItdaInputError(f"gram has shape {tuple(gram.shape)}, expected {(n, n)}")
    if backend == "numba" and on_cuda:
        raise ItdaInputError("the numba backend runs on the CPU; the atoms are on CUDA")
    if gram is None:
        wants_gram = backend == "numba" or (
            gram_fits(n, atoms.device) and gram_is_cheaper(x.shape[0], n, atoms.shape[1], k)
        )
        if wants_gram:
            if not gram_fits(n, atoms.device):
                raise ItdaInputError(
                    f"the numba backend needs the {n}x{n} Gram matrix, which exceeds the memory budget "
                    "(ITDA_GRAM_BUDGET); use backend='torch'"
                )
            gram = compute_gram(atoms)
    if backend == "auto":
        backend = "numba" if (not on_cuda and gram is not None) else "torch"
    return backend, gram


def codes_bytes(rows: int, k: int) -> int:
    """Bytes of the sparse codes of `rows` rows with k steps (int64 indices, float32 values)."""
    return rows * k * 12


def _chunk_rows(b: int, n: int, chunk_size: int | None) -> int:
    if chunk_size:
        return max(1, chunk_size)
    return max(1, min(b, CHUNK_BYTES // (4 * max(n, 1))))


def _check_exclude(exclude: torch.Tensor | None, b: int, n: int) -> None:
    if exclude is None:
        return
    if not isinstance(exclude, torch.Tensor) or exclude.shape != (b,) or exclude.is_floating_point():
        raise ItdaInputError(f"exclude must be an integer tensor of shape [{b}]")
    if b and (int(exclude.min()) < -1 or int(exclude.max()) >= n):
        raise ItdaInputError(f"exclude holds atom rows in [-1, {n}), got [{int(exclude.min())}, {int(exclude.max())}]")


def _run(
    x,
    atoms,
    k,
    gram,
    backend,
    chunk_size,
    numba_chunk,
    torch_chunk,
    rows_divisor: int = 1,
    check_finite: bool = True,
    per_row: dict[str, torch.Tensor] | None = None,
) -> SparseCodes:
    """Validate, choose the backend, and run a chunk kernel over row chunks; per_row: the kernels'
    keyword arguments of one entry per row (exclude_B, stop_B), sliced like the rows."""
    _check_inputs(x, atoms, k, check_finite)
    if codes_bytes(x.shape[0], k) > 1 << 26:  # small requests are not worth a look at free memory
        check_fits(
            2 * codes_bytes(x.shape[0], k), f"matching-pursuit codes of {x.shape[0]} rows with k={k}", atoms.device
        )
    backend, gram = _resolve(x, atoms, gram, backend, k=k)
    atoms32 = atoms.to(torch.float32).contiguous()
    x32 = x.to(device=atoms.device, dtype=torch.float32)
    gram32 = None if gram is None else gram.to(device=atoms.device, dtype=torch.float32)
    step = max(1, _chunk_rows(x.shape[0], atoms.shape[0], chunk_size) // rows_divisor)
    chunk = numba_chunk if backend == "numba" else torch_chunk
    rows = {name: t.to(atoms.device) for name, t in (per_row or {}).items()}
    parts = [
        chunk(x32[s : s + step], atoms32, k, gram32, **{name: t[s : s + step] for name, t in rows.items()})
        for s in range(0, x.shape[0], step)
    ]
    return cat_codes(parts) if parts else _empty_codes(k, atoms.device)


def matching_pursuit(
    x: torch.Tensor,
    atoms: torch.Tensor,
    k: int,
    *,
    gram: torch.Tensor | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    check_finite: bool = True,
    exclude: torch.Tensor | None = None,
    stop_cosine: float | None = None,
) -> SparseCodes:
    """Textbook matching pursuit of rows x [B, d] over unit-norm atoms [N, d], k steps.

    Each step picks j = argmax |<r, a_j>| (first index on ties), takes that correlation as
    the coefficient and subtracts it times a_j from the residual; atoms may repeat.
    Inputs of any float dtype; arithmetic in float32. `gram` (= atoms @ atoms.T, float32)
    may be passed to reuse it across calls. backend: 'numba' (CPU), 'torch' (CPU/CUDA) or
    'auto'. check_finite=False skips the NaN/inf scan for callers that validated x already.
    exclude (integer [B], -1: none): an atom row b never selects (leave-one-out), exactly MP
    over the dictionary without it; a row left with no atom (N = 1) gets index -1, value 0.
    stop_cosine (not with exclude): a row stops after the step at which its reconstruction's
    cosine with it is provably at least this, at every later step too (see `stop_energies`);
    its later slots hold index -1, value 0.
    Returns SparseCodes on the atoms' device.
    """
    from itda.pursuit.mp_torch import mp_chunk_torch

    _check_inputs(x, atoms, k, check_finite=False)  # shapes first; _run scans for NaN/inf
    _check_exclude(exclude, x.shape[0], atoms.shape[0])
    per_row = {}
    if exclude is not None:
        per_row["exclude_B"] = exclude.to(torch.int64)
    if stop_cosine is not None:
        if exclude is not None:
            raise ItdaInputError("give exclude or stop_cosine, not both")
        per_row["stop_B"] = stop_energies(x, stop_cosine)
    return _run(
        x,
        atoms,
        k,
        gram,
        backend,
        chunk_size,
        _mp_chunk_numba,
        mp_chunk_torch,
        check_finite=check_finite,
        per_row=per_row,
    )


def stop_energies(x_BD: torch.Tensor, cosine: float) -> torch.Tensor:
    """float64 [B]: the energy a row's MP steps must remove before its reconstruction's cosine with
    it is at least `cosine` at that step and every later one.

    With unit atoms each MP step removes the squared coefficient from the residual energy, and
    the residual never grows; a reconstruction x - r with |r| <= rho |x| is within angle
    asin(rho) of x, so cos >= sqrt(1 - rho^2). Hence removing (cosine^2) |x|^2 suffices. A row
    with nothing to remove (cosine <= 0 is not asked for; zero rows) never stops early.
    """
    energy_B = (x_BD.to(torch.float64) ** 2).sum(1)
    if not 0.0 < cosine < 1.0:
        return torch.full_like(energy_B, NEVER)
    return torch.where(energy_B > 0, cosine * cosine * energy_B, NEVER)


def orthogonal_matching_pursuit(
    x: torch.Tensor,
    atoms: torch.Tensor,
    k: int,
    *,
    gram: torch.Tensor | None = None,
    backend: Backend = "auto",
    chunk_size: int | None = None,
    eps: float = 1e-6,
) -> SparseCodes:
    """Batch-OMP: greedy selection as MP, coefficients refit by least squares each step.

    The residual is orthogonal to the chosen atoms; no atom is chosen twice. A row whose next
    atom is linearly dependent on its chosen ones (pivot <= eps) stops early; its remaining
    slots hold index -1 and value 0.
    """
    from itda.pursuit.mp_torch import omp_chunk_torch

    return _run(
        x,
        atoms,
        k,
        gram,
        backend,
        chunk_size,
        lambda xb, a, kk, g: _omp_chunk_numba(xb, a, kk, g, eps),
        lambda xb, a, kk, g: omp_chunk_torch(xb, a, kk, g, eps),
        rows_divisor=2,
    )


def _empty_codes(k: int, device: torch.device) -> SparseCodes:
    return SparseCodes(
        torch.empty(0, k, dtype=torch.int64, device=device),
        torch.empty(0, k, dtype=torch.float32, device=device),
        torch.empty(0, dtype=torch.float32, device=device),
    )


def _mp_chunk_numba(
    x_BD: torch.Tensor,
    atoms_ND: torch.Tensor,
    k: int,
    gram_NN: torch.Tensor,
    exclude_B: torch.Tensor | None = None,
    stop_B: torch.Tensor | None = None,
) -> SparseCodes:
    from itda.pursuit.mp_numba import mp_gram_excluding_kernel, mp_gram_kernel

    corr_BN = (x_BD @ atoms_ND.T).numpy()
    b = x_BD.shape[0]
    idx_BK = np.empty((b, k), dtype=np.int64)
    val_BK = np.empty((b, k), dtype=np.float32)
    if exclude_B is None:
        stop = np.full(b, NEVER) if stop_B is None else stop_B.numpy()
        mp_gram_kernel(corr_BN, gram_NN.numpy(), k, stop, idx_BK, val_BK)
    else:
        mp_gram_excluding_kernel(corr_BN, gram_NN.numpy(), k, exclude_B.numpy(), idx_BK, val_BK)
    val = torch.from_numpy(val_BK)
    energy = (x_BD * x_BD).sum(1) - (val * val).sum(1)
    return SparseCodes(torch.from_numpy(idx_BK), val, energy.clamp_(min=0.0))


def _omp_chunk_numba(
    x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int, gram_NN: torch.Tensor, eps: float
) -> SparseCodes:
    from itda.pursuit.mp_numba import omp_gram_kernel

    alpha0_BN = (x_BD @ atoms_ND.T).numpy()
    b = x_BD.shape[0]
    idx_BK = np.empty((b, k), dtype=np.int64)
    gamma_BK = np.empty((b, k), dtype=np.float32)
    drop_B = np.empty(b, dtype=np.float32)
    omp_gram_kernel(alpha0_BN, gram_NN.numpy(), k, eps, idx_BK, gamma_BK, drop_B)
    energy = (x_BD * x_BD).sum(1) - torch.from_numpy(drop_B)
    return SparseCodes(torch.from_numpy(idx_BK), torch.from_numpy(gamma_BK), energy.clamp_(min=0.0))
