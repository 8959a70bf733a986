"""How a dictionary's atoms are used on a token stream: pure math over sparse codes, no I/O.

`AtomUsageAccumulator` takes the codes of each batch (k (index, value) pairs per token, MP may
repeat an atom: its total counts once) and keeps, per atom: the tokens using it, its summed
coefficient, and every (token, coefficient) pair so that the tokens where it is strongest and
its coefficient on any token can be looked up; per token: L0 (distinct atoms) and the
reconstruction cosine. `co_occurrence` ranks each atom's partners by the Jaccard index of the
sets of tokens that use them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from itda.pursuit.codes import SparseCodes, atom_totals


class AtomUsage(NamedTuple):
    """Usage of N atoms over T tokens."""

    tokens: int  # T
    count_N: np.ndarray  # tokens whose code uses the atom
    coef_sum_N: np.ndarray  # summed total coefficient over those tokens
    pair_token: np.ndarray  # [P] token row of each (token, atom) use, grouped by atom (see atom_start)
    pair_value: np.ndarray  # [P] its total coefficient; within an atom, in decreasing order
    atom_start: np.ndarray  # [N + 1] pairs of atom a are pair_*[atom_start[a]:atom_start[a + 1]]
    l0_T: np.ndarray  # distinct atoms per token
    cosine_T: np.ndarray  # reconstruction cosine per token

    @property
    def mean_coef_N(self) -> np.ndarray:
        return np.divide(self.coef_sum_N, self.count_N, out=np.zeros_like(self.coef_sum_N), where=self.count_N > 0)

    def top_tokens(self, atom: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n tokens where the atom's coefficient is largest: (token rows, coefficients)."""
        s, e = self.atom_start[atom], self.atom_start[atom + 1]
        return self.pair_token[s : min(e, s + n)], self.pair_value[s : min(e, s + n)]

    def coefficients(self, atom: int, token_rows: np.ndarray) -> np.ndarray:
        """The atom's total coefficient on each of these token rows (0 where it is not used)."""
        s, e = self.atom_start[atom], self.atom_start[atom + 1]
        toks, vals = self.pair_token[s:e], self.pair_value[s:e]
        order = np.argsort(toks, kind="stable")
        toks, vals = toks[order], vals[order]
        pos = np.searchsorted(toks, token_rows)
        pos_c = np.minimum(pos, max(len(toks) - 1, 0))
        hit = (pos < len(toks)) & (toks[pos_c] == token_rows) if len(toks) else np.zeros(len(token_rows), bool)
        return np.where(hit, vals[pos_c] if len(toks) else 0.0, 0.0)

    def support_matrix(self) -> sp.csr_matrix:
        """[T, N] binary matrix of which atoms each token uses."""
        n = len(self.count_N)
        atoms = np.repeat(np.arange(n), np.diff(self.atom_start))
        data = np.ones(len(atoms), dtype=np.float32)
        return sp.csr_matrix((data, (self.pair_token, atoms)), shape=(self.tokens, n))


class AtomUsageAccumulator:
    """Feed batches of codes (and cosines) in token order; `result()` gives the AtomUsage."""

    def __init__(self, n_atoms: int):
        self.n_atoms = n_atoms
        self.tokens = 0
        self._tok: list[np.ndarray] = []
        self._atom: list[np.ndarray] = []
        self._val: list[np.ndarray] = []
        self._l0: list[np.ndarray] = []
        self._cos: list[np.ndarray] = []

    def update(self, codes: SparseCodes, cosine_B: torch.Tensor) -> None:
        totals_BK, used_BK = atom_totals(codes)
        rows, slots = torch.nonzero(used_BK, as_tuple=True)
        self._tok.append((rows + self.tokens).numpy())
        self._atom.append(codes.indices.cpu()[rows, slots].numpy())
        self._val.append(totals_BK[rows, slots].numpy())
        self._l0.append(used_BK.sum(1).numpy())
        self._cos.append(cosine_B.detach().cpu().double().numpy())
        self.tokens += codes.indices.shape[0]

    def result(self) -> AtomUsage:
        cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
        tok, atom, val = cat(self._tok, np.int64), cat(self._atom, np.int64), cat(self._val, np.float64)
        order = np.lexsort((tok, -val, atom))  # by atom, then decreasing coefficient, then token
        tok, atom, val = tok[order], atom[order], val[order]
        count = np.bincount(atom, minlength=self.n_atoms)
        start = np.concatenate([[0], np.cumsum(count)])
        return AtomUsage(
            self.tokens,
            count,
            np.bincount(atom, weights=val, minlength=self.n_atoms),
            tok,
            val,
            start,
            cat(self._l0, np.int64),
            cat(self._cos, np.float64),
        )


def co_occurrence(usage: AtomUsage, top: int = 5, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each atom's `top` partners by Jaccard index of their token sets, [N, top] (partner -1 and
    score 0 where fewer partners exist). Computed block by block of atoms: memory O(block N)."""
    s_TN = usage.support_matrix().tocsc()
    n = int(s_TN.shape[1])  # type: ignore[index]  # scipy's stubs: shape may be None
    partners = np.full((n, top), -1, dtype=np.int64)
    scores = np.zeros((n, top), dtype=np.float64)
    s_NT = s_TN.T.tocsr()
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        co = (s_NT[b0:b1] @ s_TN).tocoo()  # [block, N] shared-token counts
        keep = co.row + b0 != co.col
        r, c, shared = co.row[keep], co.col[keep], co.data[keep].astype(np.float64)
        jac = shared / (usage.count_N[r + b0] + usage.count_N[c] - shared)
        order = np.lexsort((c, -jac, r))
        r, c, jac = r[order], c[order], jac[order]
        first = np.searchsorted(r, np.arange(b1 - b0))
        rank = np.arange(len(r)) - first[r]
        sel = rank < top
        partners[r[sel] + b0, rank[sel]] = c[sel]
        scores[r[sel] + b0, rank[sel]] = jac[sel]
    return partners, scores


def histogram(values: np.ndarray, bins, *, log: bool = False) -> dict:
    """{'edges', 'counts'} of values (log-spaced edges from 1 when log=True; zeros counted apart)."""
    values = np.asarray(values, dtype=np.float64)
    out: dict = {}
    if log:
        out["zeros"] = int((values <= 0).sum())
        values = values[values > 0]
        hi = max(float(values.max()) if len(values) else 1.0, 1.0)
        bins = np.unique(np.round(np.logspace(0, np.log10(hi + 1), int(bins)))).astype(np.float64)
        if len(bins) < 2:
            bins = np.array([1.0, 2.0])
    counts, edges = np.histogram(values, bins=bins)
    out.update(edges=[float(e) for e in edges], counts=[int(c) for c in counts])
    return out
