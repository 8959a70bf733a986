"""Gram matrices of dictionaries: memory budget and a growable cache for builders."""

from __future__ import annotations

import contextvars
import os
import weakref

import torch

DEFAULT_GRAM_FRACTION = 0.25


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        page = os.sysconf("SC_PAGE_SIZE")
        return int(pages * page)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def gram_budget_bytes(device: torch.device) -> int:
    """Bytes a Gram matrix may take: ITDA_GRAM_BUDGET (bytes) or a quarter of free memory."""
    env = os.environ.get("ITDA_GRAM_BUDGET")
    if env:
        return int(float(env))
    return int(_available_bytes(device) * DEFAULT_GRAM_FRACTION)


def gram_fits(n_atoms: int, device: torch.device) -> bool:
    return 4 * n_atoms * n_atoms <= gram_budget_bytes(device)


def compute_gram(atoms_ND: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """G = A A^T in float32, computed in row blocks."""
    a_ND = atoms_ND.to(torch.float32)
    n = a_ND.shape[0]
    gram_NN = torch.empty(n, n, dtype=torch.float32, device=a_ND.device)
    for s in range(0, n, block):
        torch.matmul(a_ND[s : s + block], a_ND.T, out=gram_NN[s : s + block])
    return gram_NN


class GramPool:
    """A byte budget for the Gram matrices of the GrowingGrams made while the pool is active
    (`with pool:`), for many dictionaries built side by side (one per layer).

    `trim()` (call it between builder updates) keeps the Grams of the earliest-made members
    while their bytes fit the budget and drops the others'; a dropped Gram is rebuilt on its
    next use by replaying its appends: the same products, hence the same bits, as never dropping.
    """

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.members: list[weakref.ref[GrowingGram]] = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> GramPool:
        self._token = _ACTIVE_POOL.set(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _ACTIVE_POOL.reset(self._token)
            self._token = None

    def trim(self) -> int:
        """Drop the Grams past the budget; returns the bytes of those kept."""
        kept = 0
        for ref in self.members:
            store = ref()
            if store is None or not store.holds_gram:
                continue
            if kept + store.gram_bytes <= self.budget:
                kept += store.gram_bytes
            else:
                store.drop_gram()
        return kept


_ACTIVE_POOL: contextvars.ContextVar[GramPool | None] = contextvars.ContextVar("itda_gram_pool", default=None)


class GrowingGram:
    """Atoms and their Gram matrix, extended in place as atoms are appended.

    Capacity doubles, so appending n atoms one batch at a time costs O(n^2 d) overall.
    `atoms` and `gram` are views of the first `size` rows. Made inside an active GramPool, the
    Gram may be dropped between uses (`drop_gram`) and is then rebuilt when next read.
    """

    def __init__(self, d: int, device: torch.device | str = "cpu", with_gram: bool = True):
        self.device = torch.device(device)
        self.with_gram = with_gram
        self.size = 0
        self._atoms = torch.empty(0, d, dtype=torch.float32, device=self.device)
        self._gram = torch.empty(0, 0, dtype=torch.float32, device=self.device)
        self._dropped = False
        self._appends: list[int] = []  # rows per append, in order: what a rebuild replays
        pool = _ACTIVE_POOL.get()
        if pool is not None:
            pool.members.append(weakref.ref(self))

    @property
    def atoms(self) -> torch.Tensor:
        return self._atoms[: self.size]

    @property
    def gram(self) -> torch.Tensor | None:
        if not self.with_gram:
            return None
        if self._dropped:
            self._rebuild()
        return self._gram[: self.size, : self.size] if self.with_gram else None

    @property
    def holds_gram(self) -> bool:
        """Whether a Gram matrix is held in memory now."""
        return self.with_gram and not self._dropped and self._gram.numel() > 0

    @property
    def gram_bytes(self) -> int:
        """Bytes of the Gram matrix's buffer (its capacity), held or not."""
        cap = self._atoms.shape[0] if self._dropped else self._gram.shape[0]
        return 4 * cap * cap

    def drop_gram(self) -> None:
        """Free the Gram matrix; the next read of `gram` rebuilds it."""
        if self.with_gram:
            self._gram = torch.empty(0, 0, dtype=torch.float32, device=self.device)
            self._dropped = True

    def _rebuild(self) -> None:
        cap = self._atoms.shape[0]
        if not gram_fits(cap, self.device):
            self.with_gram = False
            return
        self._gram = torch.empty(cap, cap, dtype=torch.float32, device=self.device)
        self._dropped = False
        start = 0
        for m in self._appends:
            self._fill(start, m)
            start += m

    def _fill(self, old: int, m: int) -> None:
        """The Gram rows and columns of the m atoms from row old on, against atoms [0, old + m)."""
        cross_MN = self._atoms[old : old + m] @ self._atoms[: old + m].T
        self._gram[old : old + m, : old + m] = cross_MN
        self._gram[: old + m, old : old + m] = cross_MN.T

    def _reserve(self, n: int) -> None:
        cap = self._atoms.shape[0]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 256)
        atoms = torch.empty(new_cap, self._atoms.shape[1], dtype=torch.float32, device=self.device)
        atoms[: self.size] = self._atoms[: self.size]
        self._atoms = atoms
        if self.with_gram and not self._dropped:
            if not gram_fits(new_cap, self.device):
                self.with_gram = False
                self._gram = torch.empty(0, 0, dtype=torch.float32, device=self.device)
                return
            gram = torch.empty(new_cap, new_cap, dtype=torch.float32, device=self.device)
            gram[: self.size, : self.size] = self._gram[: self.size, : self.size]
            self._gram = gram

    def append(self, new_MD: torch.Tensor) -> None:
        """Append unit-norm rows (any float dtype)."""
        m = new_MD.shape[0]
        if m == 0:
            return
        old = self.size
        self._reserve(old + m)
        self._atoms[old : old + m] = new_MD.to(device=self.device, dtype=torch.float32)
        self.size = old + m
        self._appends.append(m)
        if self.with_gram and not self._dropped:
            self._fill(old, m)
