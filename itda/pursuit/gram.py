"""Gram matrices of dictionaries: memory budget and a growable cache for builders."""

from __future__ import annotations

import os

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


class GrowingGram:
    """Atoms and their Gram matrix, extended in place as atoms are appended.

    Capacity doubles, so appending n atoms one batch at a time costs O(n^2 d) overall.
    `atoms` and `gram` are views of the first `size` rows.
    """

    def __init__(self, d: int, device: torch.device | str = "cpu", with_gram: bool = True):
        self.device = torch.device(device)
        self.with_gram = with_gram
        self.size = 0
        self._atoms = torch.empty(0, d, dtype=torch.float32, device=self.device)
        self._gram = torch.empty(0, 0, dtype=torch.float32, device=self.device)

    @property
    def atoms(self) -> torch.Tensor:
        return self._atoms[: self.size]

    @property
    def gram(self) -> torch.Tensor | None:
        if not self.with_gram:
            return None
        return self._gram[: self.size, : self.size]

    def _reserve(self, n: int) -> None:
        cap = self._atoms.shape[0]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 256)
        atoms = torch.empty(new_cap, self._atoms.shape[1], dtype=torch.float32, device=self.device)
        atoms[: self.size] = self._atoms[: self.size]
        self._atoms = atoms
        if self.with_gram:
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
        if self.with_gram:
            cross_MN = self._atoms[old : old + m] @ self._atoms[: self.size].T
            self._gram[old : old + m, : self.size] = cross_MN
            self._gram[: self.size, old : old + m] = cross_MN.T
