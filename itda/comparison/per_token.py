"""Per-token ITDA measures over every compared token, in bounded memory (itda_loss_profile,
itda_recon_cka, itda_scaled_cka, itda_scaled_procrustes, itda_fused), from centred dictionaries a
comparison built over its whole stream.

Each layer's activations are centred first (minus a fixed per-layer mean: over the first document
chunk when streaming, over the sample in memory), and the layer's dictionary is built over the
centred rows: without it, a layer whose tokens share one large mean direction (gemma3-270m's
outlier dimension) gets a few dozen atoms that all point along it. The baselines centre too.
Every paired token of each layer is then encoded by MP (k atoms) over that layer's dictionary; a
token that is itself an atom of that layer is encoded without its own atom (leave-one-out), so no
token is scored by an atom made from it. Per token and layer this gives the MP loss
(2 - 2 cos)/d of the unit centred row and its unit-length reconstruction.
- itda_loss_profile: Spearman correlation across tokens of the two layers' losses (one float32
  per token and layer is kept).
- itda_recon_cka: linear CKA between the two layers' reconstructions, from exact float64 running
  sums (`StreamingCKAGrid`, zero pilot means: the rows have unit length).
- itda_scaled_cka, itda_scaled_procrustes: linear CKA and orthogonal Procrustes similarity between
  the two layers' reconstructions each scaled by its centred row's norm ||x_t - mu|| (ITDA's
  reconstruction of the centred activation: its direction through the dictionary, its length
  kept, the one thing unit rows drop), exact float64 sums as above.
- itda_fused: itda_scaled_cka, itda_scaled_procrustes and the norm profile (Spearman correlation
  across tokens of the activation norms ||x_t||), each [L_A, L_B] matrix standardised over its
  entries, summed, and the sum hubness-corrected by CSLS with k = 2 (`fused_grid`,
  `itda.comparison.hubness`): a pair scores by how far it stands above both layers' two best
  partners. A third of it needs no dictionary.
`token_parts` is the per-layer step, shared with the in-memory measures (`itda_measures`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from itda.comparison.cka_grids import CKAGrid, GridChoice, choose_grid, make_grid
from itda.comparison.hubness import CSLS_K, csls
from itda.comparison.jaccard import ref_keys
from itda.comparison.minibatch import ScaledMinibatchCKAGrids
from itda.comparison.plan import ROW_SLICE
from itda.dictionary import Dictionary
from itda.pursuit import compute_gram, decode
from itda.pursuit.codes import SparseCodes
from itda.pursuit.leave_one_out import matching_pursuit_leave_one_out

DECODE_ROWS = 256  # rows decoded at a time


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 rows scaled to unit length (zero rows stay zero)."""
    x = x.to(torch.float32)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def token_parts(
    unit_ND: torch.Tensor, atoms_MD: torch.Tensor, own_N: torch.Tensor, k: int, gram_MM: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit reconstructions [N, d], MP losses [N]) of unit rows over unit atoms, row n without
    atom own_N[n] (-1: none); gram_MM: the atoms' Gram matrix, if kept."""
    atoms = atoms_MD.to(torch.float32)
    if not atoms.shape[0]:
        recon = torch.zeros_like(unit_ND)
    else:  # a row left with no atom (a one-atom dictionary, its own) gets coefficient 0
        codes = matching_pursuit_leave_one_out(unit_ND, atoms, min(k, atoms.shape[0]), own_N, gram=gram_MM)
        recon = _decode_rows(codes, atoms)
    cos = (recon * unit_ND).sum(1) / recon.norm(dim=1).clamp(min=1e-12)
    return unit_rows(recon), (2 - 2 * cos) / unit_ND.shape[1]


def _decode_rows(codes: SparseCodes, atoms_MD: torch.Tensor, rows: int = DECODE_ROWS) -> torch.Tensor:
    """`decode` a few hundred rows at a time (the same bits; never the [N, k, d] gather at once)."""
    n = codes.indices.shape[0]
    if n <= rows:
        return decode(codes, atoms_MD)
    return torch.cat([decode(SparseCodes(*(t[s : s + rows] for t in codes)), atoms_MD) for s in range(0, n, rows)])


def scaled_recon(recon_LND: torch.Tensor, norm_LN: torch.Tensor) -> torch.Tensor:
    """Unit reconstructions scaled by their rows' norms (float64): ITDA's reconstruction of the row."""
    return recon_LND.double() * norm_LN.double()[..., None]


def spearman_grid(loss_a_LN: torch.Tensor, loss_b_LN: torch.Tensor) -> np.ndarray:
    """[L_A, L_B] Spearman correlations across tokens (average ranks for ties; 0 for a constant row)."""
    from scipy.stats import rankdata

    def normed(loss):
        r = torch.from_numpy(rankdata(loss.double().numpy(), axis=1))
        r = r - r.mean(1, keepdim=True)
        n = r.norm(dim=1, keepdim=True)
        return torch.where(n > 0, r / n.clamp(min=1e-300), torch.zeros_like(r))

    return (normed(loss_a_LN) @ normed(loss_b_LN).T).numpy()


FUSED_PARTS = ("itda_scaled_cka", "itda_scaled_procrustes", "norm_profile")
FUSED_PARTS_MINIBATCH = ("itda_scaled_cka", "norm_profile")  # past the exact accumulators' budget
SCALED = ("itda_scaled_cka", "itda_scaled_procrustes")


def fused_grid(parts: dict[str, np.ndarray], names=FUSED_PARTS, hubness_k: int = CSLS_K) -> np.ndarray:
    """itda_fused [L_A, L_B]: the `names` matrices (FUSED_PARTS), each standardised over its entries
    (mean 0, std 1), summed, then hubness-corrected (`itda.comparison.hubness.csls`, k = hubness_k; 0:
    the plain sum). Relative to the layers compared: a pair's value depends on the other pairs."""
    zsum = np.asarray(sum((s - s.mean()) / max(float(s.std()), 1e-12) for s in (np.asarray(parts[m]) for m in names)))
    return csls(zsum, hubness_k)


class CentredDictionaries(NamedTuple):
    """One model's basis for the per-token measures: what each layer is centred by, and the
    dictionaries built over its centred rows."""

    centres_LD: torch.Tensor  # float32 [L, d]
    dictionaries: list[Dictionary]


class _LayerIndex:
    """A layer's centre and dictionary: float32 atoms, their Gram matrix when kept (`keep_gram`)
    and, per (document, position), its atom row."""

    def __init__(self, d: Dictionary, centre_D: torch.Tensor):
        self.atoms = d.atoms.to(torch.float32)
        self.centre = centre_D.to(torch.float32)
        self.gram: torch.Tensor | None = None
        keys = ref_keys(d.refs, "token")
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def keep_gram(self, budget: int) -> int:
        """Compute and keep the atoms' Gram matrix if its bytes fit `budget`; returns the bytes kept."""
        need = 4 * len(self.atoms) ** 2
        if not len(self.atoms) or need > budget:
            return 0
        self.gram = compute_gram(self.atoms)
        return need

    def own(self, refs_N5: torch.Tensor) -> torch.Tensor:
        """int64 [N]: the atom row of each token (by document and position), -1 if none."""
        keys = ref_keys(refs_N5, "token")
        if not len(self.sorted_keys):
            return torch.full((len(keys),), -1, dtype=torch.int64)
        pos = np.searchsorted(self.sorted_keys, keys).clip(max=len(self.sorted_keys) - 1)
        return torch.from_numpy(np.where(self.sorted_keys[pos] == keys, self.order[pos], -1).astype(np.int64))


class PerTokenGrid:
    """Accumulates the per-token ITDA measures for every layer pair over batches of paired tokens.

    The CKA-type parts (itda_recon_cka, itda_scaled_*) run on the CKA grid `grid` chooses
    (`itda.comparison.cka_grids`; None: exact). On the minibatch grid itda_scaled_procrustes is not
    computed (it needs the exact cross-covariances) and itda_fused is formed from itda_scaled_cka
    and the norm profile (`FUSED_PARTS_MINIBATCH`).
    """

    def __init__(
        self,
        basis_a: CentredDictionaries,
        basis_b: CentredDictionaries | None,
        k: int,
        measures,
        grid: GridChoice | None = None,
        gram_memory: int = 0,
    ):
        """gram_memory: bytes of the layers' Gram matrices kept for the whole pass (layers of A first,
        while they fit); the other layers' are computed for each batch."""
        self.k, self.measures = k, tuple(measures)
        self.basis_a, self.basis_b = basis_a, basis_b or basis_a  # what the tokens are encoded over
        self.needed = set(self.measures) | (set(FUSED_PARTS) if "itda_fused" in self.measures else set())
        self.a = [_LayerIndex(d, c) for d, c in zip(basis_a.dictionaries, basis_a.centres_LD, strict=True)]
        self.b = (
            None
            if basis_b is None
            else [_LayerIndex(d, c) for d, c in zip(basis_b.dictionaries, basis_b.centres_LD, strict=True)]
        )
        # per side, per-token columns [L, n] of each profile: MP loss and activation norm
        self.profiles = {side: {"loss": [], "norm": []} for side in ("a", "b")}
        da = basis_a.centres_LD.shape[1]
        db = da if basis_b is None else basis_b.centres_LD.shape[1]
        self.choice = grid or choose_grid(len(self.a), da, len(self.b or self.a), db, None, 1024)

        def grid_if(wanted: bool) -> CKAGrid | None:  # unit rows: zero pilot means
            return make_grid(self.choice, "float64", (da, db)) if wanted else None

        self.unit_grid = grid_if("itda_recon_cka" in self.needed)  # unit reconstructions
        self.scaled_grid = grid_if(bool(set(SCALED) & self.needed))  # reconstructions x ||x_t||
        self.pair: ScaledMinibatchCKAGrids | None = None  # both minibatch grids, fed together
        if not self.choice.exact and self.unit_grid is not None and self.scaled_grid is not None:
            self.pair = ScaledMinibatchCKAGrids(self.choice.minibatch, self.choice.layers)
            self.unit_grid, self.scaled_grid = self.pair.unit, self.pair.scaled
        for layer in self.a + (self.b or []):
            gram_memory -= layer.keep_gram(gram_memory)

    def _side(
        self, side: str, index: list[_LayerIndex], rows: Callable[[int], torch.Tensor], refs: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This side's (unit reconstructions [n, d], centred norms ||x_t - mu|| [n]) per layer, the
        rows of layer l read as rows(l) one layer at a time; its losses and (uncentred) norms
        appended to its profiles."""
        recon, loss, centred_norm, norm = [], [], [], []
        for i, layer in enumerate(index):
            x = rows(i).to(torch.float32)
            centred = x - layer.centre
            length = centred.norm(dim=1)
            unit = centred / length.clamp(min=1e-12)[:, None]
            r, s = token_parts(unit, layer.atoms, layer.own(refs), self.k, layer.gram)
            recon.append(r)
            loss.append(s)
            centred_norm.append(length)
            norm.append(x.norm(dim=1))
        self.profiles[side]["loss"].append(torch.stack(loss))
        self.profiles[side]["norm"].append(torch.stack(norm))
        return recon, centred_norm

    def update_layers(
        self,
        rows_a: Callable[[int], torch.Tensor],
        refs_a: torch.Tensor,
        rows_b: Callable[[int], torch.Tensor] | None,
        refs_b: torch.Tensor | None,
    ) -> None:
        """One batch of paired rows, each layer's read when it is encoded (rows_a(l): [n, d_A], refs_a [n, 5];
        rows_b and refs_b: the same tokens in B, None when B is A), so a caller can let each layer's
        activations go once read."""
        if not len(refs_a):
            return
        recon_a, norm_a = self._side("a", self.a, rows_a, refs_a)
        if self.b is None:
            recon_b, norm_b = recon_a, norm_a
        else:
            if rows_b is None or refs_b is None:
                raise ValueError("B is not A: its rows ys and refs_b are needed")
            recon_b, norm_b = self._side("b", self.b, rows_b, refs_b)
        if self.pair is not None:  # the scaled rows are the unit ones weighted by their norms
            self.pair.update(recon_a, recon_b, norm_a, norm_b)
            return
        for s in range(0, len(refs_a), ROW_SLICE):  # float64 copies of ROW_SLICE rows at a time
            ra, rb = [r[s : s + ROW_SLICE] for r in recon_a], [r[s : s + ROW_SLICE] for r in recon_b]
            if self.unit_grid is not None:
                self.unit_grid.update(ra, rb)
            if self.scaled_grid is not None:
                self.scaled_grid.update(
                    [scaled_recon(r, n[s : s + ROW_SLICE]) for r, n in zip(ra, norm_a, strict=True)],
                    [scaled_recon(r, n[s : s + ROW_SLICE]) for r, n in zip(rb, norm_b, strict=True)],
                )

    def sum_over(self, exchange) -> None:
        """Under torchrun: every rank's profiles and CKA sums combined (rank order; the measures do
        not depend on token order)."""
        keys = [(side, name) for side in ("a", "b") if side == "a" or self.b is not None for name in ("loss", "norm")]
        cols = [self.profile(side, name) for side, name in keys]
        both = exchange.gather_rows(torch.cat(cols).T.contiguous()).T
        for (side, name), part in zip(keys, torch.split(both, [len(c) for c in cols]), strict=True):
            self.profiles[side][name] = [part]
        for grid in (self.unit_grid, self.scaled_grid):
            if grid is not None:
                grid.sum_over(exchange)

    def profile(self, side: str, name: str) -> torch.Tensor:
        """[L, n]: the per-token column of `name` (loss or norm) for side a or b (B is A: side a)."""
        side = "a" if self.b is None else side
        parts = self.profiles[side][name]
        index = self.b if side != "a" and self.b is not None else self.a
        return torch.cat(parts, 1) if parts else torch.zeros(len(index), 0)

    def matrices(self) -> dict[str, np.ndarray]:
        out = {}
        if "itda_loss_profile" in self.needed:
            out["itda_loss_profile"] = spearman_grid(self.profile("a", "loss"), self.profile("b", "loss"))
        if "norm_profile" in self.needed:
            out["norm_profile"] = spearman_grid(self.profile("a", "norm"), self.profile("b", "norm"))
        if self.unit_grid is not None:
            out["itda_recon_cka"] = self.unit_grid.matrices(procrustes=False)["cka"]
        if self.scaled_grid is not None:
            m = self.scaled_grid.matrices(procrustes="itda_scaled_procrustes" in self.needed)
            out["itda_scaled_cka"] = m["cka"]
            if "procrustes" in m:  # the exact grid only
                out["itda_scaled_procrustes"] = m["procrustes"]
        if "itda_fused" in self.needed:
            out["itda_fused"] = fused_grid(out, FUSED_PARTS if self.choice.exact else FUSED_PARTS_MINIBATCH)
        return {m: out[m] for m in self.measures if m in out}
