"""Choose documents that cover a dictionary's atoms: pure math on a [documents x atoms] support matrix.

Each document is the set of atoms its tokens' MP codes use. Strategies (budget = documents):
- `greedy`: greedy max-coverage (lazy evaluation: a document's gain only shrinks as the covered
  set grows): each pick adds the most atoms not yet covered; ties go to the lower document index.
  The (1 - 1/e)-approximation of maximum coverage; the analogue of SAE-GreedSelect (Yang et al.
  2025) with ITDA atoms as the features.
- `simscale`: diversity by similarity under a scaling threshold (our reading of SAE-SimScale):
  documents in decreasing complexity (atoms used), each accepted when its cosine (binary atom
  vectors) to every accepted document is at most tau; tau starts at `tau0` and rises by `step`
  until the budget is filled.
- `complexity`: the documents using the most distinct atoms.
Baselines: `random` (seeded) and `longest` (most tokens).
"""

from __future__ import annotations

import heapq
from typing import cast

import numpy as np
import scipy.sparse as sp

STRATEGIES = ("greedy", "simscale", "complexity")
BASELINES = ("random", "longest")


def _dims(s) -> tuple[int, int]:
    """(rows, columns) of a sparse matrix (scipy's stubs type `.shape` as possibly None)."""
    return cast(tuple[int, int], s.shape)


def _binary(sets: sp.spmatrix) -> sp.csr_matrix:
    s = sp.csr_matrix(sets, dtype=np.float64, copy=True)
    s.eliminate_zeros()
    s.sum_duplicates()
    s.data[:] = 1.0
    return s


def greedy_max_coverage(sets: sp.spmatrix, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen documents in order, atoms each newly covered)."""
    s = _binary(sets)
    covered = np.zeros(_dims(s)[1], dtype=bool)
    heap = [(-int(n), d) for d, n in enumerate(np.diff(s.indptr))]
    heapq.heapify(heap)
    chosen, gains = [], []
    while heap and len(chosen) < budget:
        neg, d = heapq.heappop(heap)
        atoms = s.indices[s.indptr[d] : s.indptr[d + 1]]
        gain = int((~covered[atoms]).sum())
        if heap and gain < -heap[0][0] or (heap and gain == -heap[0][0] and heap[0][1] < d):
            heapq.heappush(heap, (-gain, d))  # stale: re-insert with its true gain
            continue
        chosen.append(d)
        gains.append(gain)
        covered[atoms] = True
    return np.array(chosen, dtype=np.int64), np.array(gains, dtype=np.int64)


def complexity_order(sets: sp.spmatrix, budget: int) -> np.ndarray:
    n_atoms = np.diff(_binary(sets).indptr)
    return np.lexsort((np.arange(len(n_atoms)), -n_atoms))[:budget]


def simscale(sets: sp.spmatrix, budget: int, tau0: float = 0.3, step: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(chosen documents in order, the threshold each was accepted under). Similarities come from an
    inverted index atom -> accepted documents, so a candidate costs its overlaps, not the budget."""
    s = _binary(sets)
    sizes = np.diff(s.indptr)
    order = complexity_order(s, _dims(s)[0])
    order = order[sizes[order] > 0]
    budget = min(budget, len(order))
    holders: list[list[int]] = [[] for _ in range(_dims(s)[1])]  # atom -> positions in `chosen`
    chosen: list[int] = []
    taus: list[float] = []
    taken = np.zeros(_dims(s)[0], dtype=bool)
    tau = tau0
    while len(chosen) < budget:
        for d in order:
            if len(chosen) >= budget:
                break
            if taken[d]:
                continue
            atoms = s.indices[s.indptr[d] : s.indptr[d + 1]]
            hits = [h for a in atoms for h in holders[a]]
            if hits:
                shared = np.bincount(np.array(hits), minlength=len(chosen))
                cos = shared / np.sqrt(sizes[chosen] * float(sizes[d]))
                if cos.max() > tau + 1e-12:
                    continue
            for a in atoms:
                holders[a].append(len(chosen))
            chosen.append(int(d))
            taus.append(round(tau, 6))
            taken[d] = True
        tau += step
    return np.array(chosen, dtype=np.int64), np.array(taus)


def random_order(n_docs: int, budget: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n_docs)[:budget]


def longest_order(doc_tokens: np.ndarray, budget: int) -> np.ndarray:
    return np.lexsort((np.arange(len(doc_tokens)), -np.asarray(doc_tokens)))[:budget]


def coverage_curve(sets: sp.spmatrix, order: np.ndarray) -> np.ndarray:
    """Atoms covered after each document of `order` (cumulative union)."""
    s = _binary(sets)
    covered = np.zeros(_dims(s)[1], dtype=bool)
    out = np.zeros(len(order), dtype=np.int64)
    total = 0
    for i, d in enumerate(order):
        atoms = s.indices[s.indptr[d] : s.indptr[d + 1]]
        total += int((~covered[atoms]).sum())
        covered[atoms] = True
        out[i] = total
    return out


def select_documents(
    sets: sp.spmatrix,
    budget: int,
    strategy: str = "greedy",
    *,
    doc_tokens: np.ndarray | None = None,
    seed: int = 0,
    tau0: float = 0.3,
    step: float = 0.1,
) -> np.ndarray:
    """The chosen documents (row indices of `sets`) in order of choice."""
    if strategy == "greedy":
        return greedy_max_coverage(sets, budget)[0]
    if strategy == "simscale":
        return simscale(sets, budget, tau0, step)[0]
    if strategy == "complexity":
        return complexity_order(sets, budget)
    if strategy == "random":
        return random_order(_dims(sets)[0], budget, seed)
    if strategy == "longest":
        if doc_tokens is None:
            raise ValueError("longest needs doc_tokens")
        return longest_order(doc_tokens, budget)
    raise ValueError(f"unknown strategy {strategy!r}")
