"""`--mode reference`: the public ITDA trainer's procedure, reproduced operation for operation.

Per batch (the reference's `ITDATrainer.update`; see README "Build modes"):
1. While the dictionary holds fewer than d atoms: the batch's distinct rows
   (`torch.unique(dim=0)`, lexicographic) ordered by `torch.sort(counts, descending=True)` —
   not a stable sort, so ties come in whatever order that sort returns — seed it, up to d;
   each is identified by its first position; all atoms are then renormalised.
2. In the same step the whole batch is encoded by matching pursuit against the dictionary
   (k full correlation GEMMs on the residual, argmax |c|, coefficient += c), reconstructed as
   one dense [B, N] x [N, d] product, and scored with mean((x/|x| - x_hat/|x_hat|)^2), norms
   clamped at 1e-9 (so an empty reconstruction scores 1/d).
3. Every row over the threshold is appended raw, in batch order, and all atoms renormalised.
4. With max_atoms, atoms past the first max_atoms are dropped.
The arithmetic is the reference's (float32, the same torch operations on the same shapes), so
the same stream gives the same atoms; it is as slow as the reference (k GEMMs per batch).
"""

from __future__ import annotations

import torch

from itda.builder.builder import BatchStats, BuildConfig, DictionaryBuilder, _check_batch, register_mode
from itda.configfields import FieldError
from itda.dictionary import Dictionary, DictionaryMeta

_EPS = 1e-9


class RenormalisingStore:
    """Atoms kept as the reference keeps them: appended, then every row divided by its norm."""

    gram = None

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.atoms = torch.empty(0, d, dtype=torch.float32, device=device)

    @property
    def size(self) -> int:
        return self.atoms.shape[0]

    def append(self, rows_MD: torch.Tensor) -> None:
        atoms = torch.cat([self.atoms, rows_MD.to(device=self.atoms.device, dtype=torch.float32)])
        self.atoms = atoms / torch.norm(atoms, dim=1).clamp_min(_EPS).unsqueeze(1)

    def restore(self, atoms_ND: torch.Tensor) -> None:
        self.atoms = atoms_ND.to(device=self.atoms.device, dtype=torch.float32).clone()

    def crop(self, n: int) -> None:
        self.atoms = self.atoms[:n].clone()


def dense_mp_reconstruction(x_BD: torch.Tensor, atoms_ND: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's matching pursuit and decode, with its dense coefficient matrix."""
    b = x_BD.shape[0]
    rows = torch.arange(b, device=x_BD.device)
    residual = x_BD.clone()
    coeffs_BN = torch.zeros(b, atoms_ND.shape[0], device=x_BD.device)
    for _ in range(k):
        corr_BN = torch.matmul(residual, atoms_ND.T)
        best_B = torch.argmax(torch.abs(corr_BN), dim=1)
        val_B = corr_BN[rows, best_B]
        coeffs_BN[rows, best_B] += val_B
        residual -= val_B.unsqueeze(1) * atoms_ND[best_B]
    return torch.matmul(coeffs_BN, atoms_ND)


def reference_loss(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    nx = x_BD / x_BD.norm(dim=1, keepdim=True).clamp_min(_EPS)
    nr = recon_BD / recon_BD.norm(dim=1, keepdim=True).clamp_min(_EPS)
    return (nx - nr).pow(2).mean(dim=1)


def seeding_order(x_BD: torch.Tensor, limit: int) -> torch.Tensor:
    """First positions of up to `limit` distinct rows, in the order of torch.sort(counts, descending=True)."""
    _, inverse, counts = torch.unique(x_BD, dim=0, return_inverse=True, return_counts=True)
    _, order = torch.sort(counts, descending=True)
    first = torch.full((counts.shape[0],), x_BD.shape[0], dtype=torch.int64, device=x_BD.device)
    first.scatter_reduce_(0, inverse, torch.arange(x_BD.shape[0], device=x_BD.device), reduce="amin")
    return first[order[:limit]]


class ReferenceBuilder(DictionaryBuilder):
    """DictionaryBuilder whose update() is the reference trainer's (module docstring)."""

    def __init__(
        self,
        d: int,
        config: BuildConfig,
        *,
        init: Dictionary | None = None,
        meta: DictionaryMeta | None = None,
        device: torch.device | str = "cpu",
    ):
        super().__init__(d, config, init=None, meta=meta, device=device)
        self.store = RenormalisingStore(d, self.device)
        if init is not None:
            super()._append(init.atoms.to(torch.float32), init.refs)

    def _restore(self, atoms_ND: torch.Tensor, refs_N5: torch.Tensor, appends: list[int] | None = None) -> None:
        """Set the exact (already renormalised) atoms: renormalising them again would change their bits."""
        self.store.restore(atoms_ND)
        self._refs = [refs_N5.cpu()]
        self._appends = list(appends or [])

    def update(
        self, acts: torch.Tensor, refs: torch.Tensor | None = None, *, score_chunk: int | None = None, exchange=None
    ) -> BatchStats:
        """The reference's step on one batch (scored whole: score_chunk is ignored; one process only)."""
        if exchange is not None:
            raise FieldError(
                "mode", "{field} reference runs in one process (the reference adds a batch's rows all at once)"
            )
        refs = _check_batch(acts, refs, self.d)
        x_BD = acts.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(x_BD.norm(dim=1)).all()):
            raise FieldError(
                "mode",
                "activation norms overflow float32, as the reference's norms do at this scale; "
                "use {field} improved (it scales rows exactly) or rescale the activations",
            )
        if self.config.max_atoms is not None and self.size >= self.config.max_atoms:
            return self._finish(x_BD.shape[0], 0, 0, 0.0)  # the reference stops updating when full
        seeded = 0
        if self.size < self.d:
            pos = seeding_order(x_BD, self.d - self.size)
            self._append(x_BD[pos], refs[pos.cpu()])
            seeded = len(pos)
        if self.size:
            loss_B = reference_loss(x_BD, dense_mp_reconstruction(x_BD, self.store.atoms, self.config.k))
        else:
            loss_B = torch.full((x_BD.shape[0],), 1.0 / self.d, device=x_BD.device)
        over = torch.nonzero(loss_B > self.config.loss_threshold(self.d), as_tuple=True)[0]
        if len(over):
            self._append(x_BD[over], refs[over.cpu()])
        if self.config.max_atoms is not None and self.size > self.config.max_atoms:
            self.store.crop(self.config.max_atoms)
            self._refs = [self.refs()[: self.config.max_atoms]]
        return self._finish(x_BD.shape[0], seeded + len(over), seeded + len(over), float(loss_B.mean()))


register_mode("reference", ReferenceBuilder)
