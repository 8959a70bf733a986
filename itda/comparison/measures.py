"""Representation similarity measures on paired activations X [n, dx], Y [n, dy] (rows = the same inputs).

Every function returns a Similarity (higher = more alike). Formulas follow the papers:
linear CKA (Kornblith et al. 2019), debiased CKA via the unbiased HSIC (Song et al. 2012),
SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018), relative representations (Moschella
et al. 2023), mutual k-NN alignment (Huh et al. 2024), Procrustes (Williams et al. 2021).
The in-memory measures are split into prepare(z) (per representation) and pair(p, q), so
that layer-by-layer matrices prepare each layer once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

import itda.comparison.registry as registry
from itda.comparison.cka import linear_cka
from itda.comparison.registry import check_measures, names_of
from itda.comparison.result import Similarity
from itda.comparison.streaming import StreamingCKA, _as64
from itda.errors import ItdaInputError


def _subsample(n: int, max_rows: int, seed: int) -> torch.Tensor | None:
    if n <= max_rows:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows]


class Measure(NamedTuple):
    prepare: Callable[[torch.Tensor], Any]
    pair: Callable[[Any, Any], float]
    details: dict


# -- RBF CKA -------------------------------------------------------------------------------
def _rbf_prepare(z: torch.Tensor, sigma_scale: float = 1.0) -> torch.Tensor:
    n = z.shape[0]
    d2 = torch.cdist(z, z).pow(2)
    med = torch.median(d2[~torch.eye(n, dtype=torch.bool)].sqrt())
    sigma = float(med) * sigma_scale
    k = torch.exp(-d2 / (2 * sigma * sigma)) if sigma > 0 else torch.ones_like(d2)
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    return kc / kc.norm()


def _rbf_pair(kc: torch.Tensor, lc: torch.Tensor) -> float:
    return float((kc * lc).sum())


# -- SVCCA / PWCCA -----------------------------------------------------------------------------
def _basis(z: torch.Tensor, rank_tol: float = 1e-10) -> torch.Tensor:
    q, r = torch.linalg.qr(z)
    diag = r.diagonal().abs()
    return q[:, : int((diag > rank_tol * diag.max()).sum())]


def svcca_prepare(z: torch.Tensor, keep: float = 0.99) -> torch.Tensor:
    """Orthonormal basis of the centred z's leading principal components (`keep` of the variance).

    The components U S = Z V come from the eigenvectors V of Z^T Z ([d, d]), not from an SVD of
    the [n, d] rows: the same basis up to float64 rounding, several times faster for n >> d.
    """
    zc = z - z.mean(0)
    if zc.shape[0] < zc.shape[1]:  # more columns than rows: the SVD is the cheaper one
        u, s, _ = torch.linalg.svd(zc, full_matrices=False)
        var, comps = s * s, u * s
    else:
        evals, evecs = torch.linalg.eigh(zc.T @ zc)
        var, order = evals.flip(0).clamp(min=0), torch.arange(evals.shape[0] - 1, -1, -1)
        comps = None
    frac = torch.cumsum(var, 0) / var.sum()
    k = min(int(torch.searchsorted(frac, torch.tensor(keep, dtype=torch.float64)).item()) + 1, var.shape[0])
    if comps is None:
        comps = zc @ evecs[:, order[:k]]
    return _basis(comps[:, :k])


def svcca_pair(qx: torch.Tensor, qy: torch.Tensor) -> float:
    """Mean canonical correlation: the singular values of qx^T qy, as square roots of the
    eigenvalues of its smaller Gram matrix (a fraction of an SVD's time; float64 rounding)."""
    m = qx.T @ qy
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram).clamp(0, 1).sqrt().mean())


def _pwcca_prepare(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zc = z - z.mean(0)
    return _basis(zc), zc


def _pwcca_pair(px, py) -> float:
    """Canonical correlations weighted by sum_j |<h_i, x_j>| (h_i unit canonical variates of X)."""
    (qx, xc), (qy, _) = px, py
    u, rho, _ = torch.linalg.svd(qx.T @ qy, full_matrices=False)
    alpha = ((qx @ u).T @ xc).abs().sum(1)
    return float((alpha / alpha.sum() * rho.clamp(0, 1)).sum())


# -- relative representations, mutual k-NN ---------------------------------------------------
def relative_prepare(z: torch.Tensor, anchor_idx: torch.Tensor) -> torch.Tensor:
    zn = z / z.norm(dim=1, keepdim=True).clamp(min=1e-30)
    rel = zn @ zn[anchor_idx].T
    return rel / rel.norm(dim=1, keepdim=True).clamp(min=1e-30)


def relative_pair(rx: torch.Tensor, ry: torch.Tensor) -> float:
    return float((rx * ry).sum(1).mean())


def _knn_prepare(z: torch.Tensor, k: int) -> np.ndarray:
    zn = z / z.norm(dim=1, keepdim=True).clamp(min=1e-30)
    sim = zn @ zn.T
    sim.fill_diagonal_(-math.inf)
    return np.sort(sim.topk(k, dim=1).indices.numpy(), axis=1)


def _knn_pair(nx_: np.ndarray, ny_: np.ndarray) -> float:
    k = nx_.shape[1]
    return float(np.mean([np.intersect1d(a, b, assume_unique=True).size / k for a, b in zip(nx_, ny_, strict=True)]))


def _rbf_measure(n_rows, max_rows, anchors, knn, keep, seed):
    idx = _subsample(n_rows, min(max_rows, 2048), seed)
    return Measure(_rbf_prepare, _rbf_pair, {"rows": min(n_rows, 2048, max_rows)}), idx


def _svcca_measure(n_rows, max_rows, anchors, knn, keep, seed):
    return Measure(lambda z: svcca_prepare(z, keep), svcca_pair, {"keep": keep}), _subsample(n_rows, max_rows, seed)


def _pwcca_measure(n_rows, max_rows, anchors, knn, keep, seed):
    return Measure(_pwcca_prepare, _pwcca_pair, {}), _subsample(n_rows, max_rows, seed)


def _relative_measure(n_rows, max_rows, anchors, knn, keep, seed):
    idx = _subsample(n_rows, max_rows, seed)
    m = n_rows if idx is None else len(idx)
    anchor_idx = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[: min(anchors, m)]
    return Measure(lambda z: relative_prepare(z, anchor_idx), relative_pair, {"anchors": len(anchor_idx)}), idx


def _knn_measure(n_rows, max_rows, anchors, knn, keep, seed):
    idx = _subsample(n_rows, max_rows, seed)
    if (n_rows if idx is None else len(idx)) <= knn:
        raise ItdaInputError(f"mutual k-NN needs more than k={knn} rows")
    return Measure(lambda z: _knn_prepare(z, knn), _knn_pair, {"k": knn}), idx


# the kept-rows measures of the registry (kind KEPT_ROWS): name -> (prepare, pair) factory
_FACTORIES = {
    "cka_rbf": _rbf_measure,
    "svcca": _svcca_measure,
    "pwcca": _pwcca_measure,
    "relative": _relative_measure,
    "mutual_knn": _knn_measure,
}


def make_measure(
    name: str,
    n_rows: int,
    *,
    max_rows: int = 4096,
    anchors: int = 300,
    knn: int = 10,
    keep: float = 0.99,
    seed: int = 0,
) -> tuple[Measure, torch.Tensor | None]:
    """The measure's (prepare, pair) and the row subsample it uses (None = all rows)."""
    if name not in _FACTORIES:
        raise ItdaInputError(f"unknown in-memory measure {name!r}")
    return _FACTORIES[name](n_rows, max_rows, anchors, knn, keep, seed)


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as64(x), _as64(y)
    if x.shape[0] != y.shape[0]:
        raise ItdaInputError(f"X and Y must have the same rows (inputs): {x.shape[0]} vs {y.shape[0]}")
    return x, y


def _one(name: str, x, y, **kw) -> Similarity:
    x, y = _pair(x, y)
    measure, idx = make_measure(name, x.shape[0], **kw)
    if idx is not None:
        x, y = x[idx], y[idx]
    if name == "pwcca" and x.shape[0] <= max(x.shape[1], y.shape[1]):
        raise ItdaInputError(f"PWCCA needs more rows than dimensions (n={x.shape[0]}, d={x.shape[1]}, {y.shape[1]})")
    px, py = measure.prepare(x), measure.prepare(y)
    details = {**measure.details, "rows": x.shape[0]}
    if name == "svcca":
        details.update(components_x=px.shape[1], components_y=py.shape[1])
    return Similarity(name, measure.pair(px, py), details)


def rbf_cka(x, y, *, max_rows: int = 2048, seed: int = 0) -> Similarity:
    """CKA with Gaussian kernels (bandwidth = median pairwise distance) on up to max_rows rows."""
    return _one("cka_rbf", x, y, max_rows=max_rows, seed=seed)


def svcca(x, y, *, keep: float = 0.99, max_rows: int = 1 << 30) -> Similarity:
    """SVCCA: keep the principal components explaining `keep` of the variance, CCA, mean correlation."""
    return _one("svcca", x, y, keep=keep, max_rows=max_rows)


def pwcca(x, y, *, max_rows: int = 1 << 30) -> Similarity:
    """PWCCA: canonical correlations weighted by how much of X each canonical variate accounts for."""
    return _one("pwcca", x, y, max_rows=max_rows)


def relative_similarity(x, y, *, anchors: int = 300, seed: int = 0, max_rows: int = 1 << 30) -> Similarity:
    """Relative representations: rows as cosines to shared anchors; mean row cosine across X and Y."""
    return _one("relative", x, y, anchors=anchors, seed=seed, max_rows=max_rows)


def mutual_knn(x, y, *, k: int = 10, max_rows: int = 4096, seed: int = 0) -> Similarity:
    """Mutual k-nearest-neighbour alignment: mean |N_X(i) & N_Y(i)| / k with cosine neighbours."""
    return _one("mutual_knn", x, y, knn=k, max_rows=max_rows, seed=seed)


STREAMED = names_of(registry.STREAMED)  # cka, cka_debiased, procrustes
IN_MEMORY = names_of(registry.KEPT_ROWS)  # cka_rbf, svcca, pwcca, relative, mutual_knn
MEASURES = STREAMED + IN_MEMORY


def compare_activations(x, y, measures: Sequence[str] = MEASURES) -> dict[str, Similarity]:
    """All requested activation measures on one pair of representations."""
    check_measures(measures)
    out: dict[str, Similarity] = {}
    if set(STREAMED) & set(measures):
        out.update({k: v for k, v in linear_cka(x, y).items() if k in measures})
    for name in measures:
        if name in IN_MEMORY:
            out[name] = _one(name, x, y)
    return out


PREPARED_BUDGET = 256 * 2**20  # bytes of prepared ys similarity_grid holds at once


def similarity_grid(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], name: str, budget: int = PREPARED_BUDGET, **kw
) -> np.ndarray:
    """[len(xs), len(ys)] matrix of an in-memory measure. The ys are prepared once each, in blocks of at
    most `budget` bytes (at least one); each block meets every x prepared afresh, one at a time."""
    n = xs[0].shape[0]
    measure, idx = make_measure(name, n, **kw)
    pick = (lambda z: _as64(z)) if idx is None else (lambda z: _as64(z)[idx])
    out = np.empty((len(xs), len(ys)))
    start = 0
    while start < len(ys):
        block, held = [], 0
        while start + len(block) < len(ys) and (not block or held < budget):
            block.append(measure.prepare(pick(ys[start + len(block)])))
            held += _nbytes(block[-1])
        for i, p in enumerate(measure.prepare(pick(x)) for x in xs):
            out[i, start : start + len(block)] = [measure.pair(p, q) for q in block]
        start += len(block)
        del block
    return out


def _nbytes(prepared) -> int:
    """Bytes of a prepared representation (tensors, arrays, or tuples of them)."""
    if isinstance(prepared, tuple):
        return sum(_nbytes(p) for p in prepared)
    if isinstance(prepared, torch.Tensor):
        return prepared.numel() * prepared.element_size()
    return int(getattr(prepared, "nbytes", 0))


def compare_stream(batches, measures: Sequence[str] = MEASURES, *, max_rows: int = 4096) -> dict[str, Similarity]:
    """The measures over a stream of paired batches (x [b, dx], y [b, dy]).

    Linear CKA, debiased CKA and Procrustes are exact over the whole stream; the in-memory
    measures use the first max_rows rows.
    """
    check_measures(measures)
    acc = StreamingCKA()
    kept_x: list[torch.Tensor] = []
    kept_y: list[torch.Tensor] = []
    n_kept = 0
    for x, y in batches:
        x, y = _pair(x, y)
        acc.update(x, y)
        if n_kept < max_rows:
            take = min(max_rows - n_kept, x.shape[0])
            kept_x.append(x[:take])
            kept_y.append(y[:take])
            n_kept += take
    out = {k: v for k, v in acc.result().items() if k in measures}
    if any(m in IN_MEMORY for m in measures):
        x, y = torch.cat(kept_x), torch.cat(kept_y)
        for name in measures:
            if name in IN_MEMORY:
                out[name] = _one(name, x, y)
    return out
