"""ITDA-based layer similarity on a sample of paired tokens (rows of X_i and Y_j are the same tokens).

Per layer, an ITDA dictionary is built over the first `fit` fraction of the sample (improved
mode, in row order), so its atoms are sample rows (`anchors`, row indices); the measures are
taken on rows no dictionary they are encoded with contains (an atom reconstructs itself, and
which early rows become atoms depends on stream order, not on the layer). The anchor-based
measures use the remaining rows only. The per-token measures (loss profile, reconstruction CKA)
see every row of the sample, as the baselines do: the rows are centred (minus their mean over the
sample), a second dictionary is built over all centred rows and every centred row is encoded by it
leave-one-out (a row that is an atom is encoded without its own atom), the definition
`itda.comparison.per_token` streams over a whole corpus. For a pair:

- `itda_loss_profile`: Spearman correlation across tokens of each (centred) token's MP loss
  (2 - 2 cos)/d under the layer's own dictionary: do the two layers find the same tokens hard?
- `itda_code_overlap`: shared anchors P = anchors_i ∪ anchors_j; every token is encoded by MP
  over X_i[P] and over Y_j[P] (the same tokens as atoms in both layers); mean over tokens of the
  Jaccard index of the two sets of atoms used.
- `itda_cross_recon`: how well the other layer's atom positions span this layer: mean cosine of
  Y_j reconstructed over Y_j[anchors_i], divided by Y_j over Y_j[anchors_j] (its own), averaged
  with the same from the other side.
- `itda_relative`: relative representations (Moschella et al. 2023) with the shared ITDA anchors
  P instead of random ones: each token as its cosines to X_i[P] (resp. Y_j[P]), rows centred,
  linear CKA between the two [N, |P|] matrices.
- `itda_code_cosine`: cosine between a token's MP coefficient vectors over the shared anchors
  (both indexed by P), mean over tokens.
- `itda_recon_cka`: each measured token's ITDA reconstruction in its layer (MP over the layer's
  own dictionary, of the unit centred token, renormalised to unit length): linear CKA between the two
  layers' [N, d] reconstructions. CKA in the geometry ITDA works in (directions, not norms,
  so a few high-norm tokens cannot dominate), seen through the dictionary.
- `itda_scaled_cka`, `itda_scaled_procrustes`: the same reconstructions, each scaled by its
  centred row's norm ||x_t - mu|| (ITDA's reconstruction of the centred activation), compared by
  linear CKA and by orthogonal Procrustes similarity (nuclear norm of the centred cross-covariance
  over the two Frobenius norms).
- `itda_fused` (grids only): csls(z(itda_scaled_cka) + z(itda_scaled_procrustes) + z(norm
  profile)), each [L_A, L_B] matrix standardised over its entries, the sum hubness-corrected
  (CSLS, k = 2: `itda.comparison.hubness`); the norm profile is the Spearman correlation across
  tokens of the activation norms (`itda.comparison.per_token.fused_grid`).
All but itda_fused are symmetric and lie in [-1, 1] (mostly [0, 1]); 1 for a layer against
itself. itda_fused is a score relative to the grid, for ranking layers: above 0 where a pair
stands above both layers' usual partners.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import itda.comparison.registry as registry
from itda.builder import build_dictionary
from itda.builder.builder import BuildConfig
from itda.comparison.cka import gram_cka, linear_cka
from itda.comparison.per_token import FUSED_PARTS, fused_grid, scaled_recon, spearman_grid, token_parts, unit_rows
from itda.evaluation.metrics import recon_terms
from itda.pursuit import matching_pursuit
from itda.pursuit.api import DEFAULT_K
from itda.pursuit.codes import atom_totals

ITDA_MEASURES = registry.names_of(registry.PER_TOKEN, registry.ITDA_KEPT_ROWS)
# every row, leave-one-out (layer_sample(per_token=True))
PER_TOKEN = registry.names_of(registry.PER_TOKEN)


@dataclass
class LayerSample:
    unit: torch.Tensor  # [N, d] unit rows (zero rows stay zero)
    anchors: torch.Tensor  # [M] int64 rows of the fit part chosen as atoms, in order of addition
    n_fit: int  # rows [0, n_fit) built the dictionary; the anchor-based measures use rows [n_fit, N)
    own_cos: torch.Tensor  # [N - n_fit] reconstruction cosine of rows n_fit: under the dictionary of anchors
    # per-token parts (None unless layer_sample(per_token=True)), of the rows centred by their mean:
    loss: torch.Tensor | None  # [N] every centred row's MP loss over the dictionary of all centred rows, leave-one-out
    recon: torch.Tensor | None  # [N, d] every centred row's reconstruction (the same MP), unit length
    norm: torch.Tensor | None  # [N] every row's activation norm ||x_t|| (uncentred: the norm profile)
    centred_norm: torch.Tensor | None  # [N] every centred row's norm ||x_t - mu|| (the scaled reconstructions)
    anchors_all: torch.Tensor | None  # [M'] rows kept by the dictionary built over all centred rows

    @property
    def held(self) -> torch.Tensor:
        return self.unit[self.n_fit :]


def _per_token(part: torch.Tensor | None) -> torch.Tensor:
    """A LayerSample's per-token part (loss, recon, norm, centred_norm): None when it was skipped."""
    if part is None:
        raise ValueError("this measure needs the per-token parts: layer_sample(..., per_token=True)")
    return part


def mp_cosine(x_ND: torch.Tensor, atoms_MD: torch.Tensor, k: int):
    codes = matching_pursuit(x_ND, atoms_MD, min(k, atoms_MD.shape[0]), check_finite=False)
    return codes, recon_terms(x_ND, codes, atoms_MD).cosine


def dictionary_rows(unit_ND: torch.Tensor, k: int, min_cosine: float, batch: int) -> torch.Tensor:
    """Rows of unit_ND an ITDA dictionary built over them in order keeps, in order of addition."""
    n = unit_ND.shape[0]
    refs = torch.full((n, 5), -1, dtype=torch.int64)
    refs[:, 0] = torch.arange(n)
    d = build_dictionary(
        ((unit_ND[s : min(s + batch, n)], refs[s : s + batch]) for s in range(0, n, batch)), k=k, min_cosine=min_cosine
    )
    return d.refs[:, 0].clone()


def layer_sample(
    x_ND: torch.Tensor,
    k: int = DEFAULT_K,
    min_cosine: float = BuildConfig.DEFAULT_MIN_COSINE,
    fit: float = 0.5,
    batch: int = 1024,
    per_token: bool = True,
) -> LayerSample:
    """The layer's ITDA dictionary over the first `fit` of the rows and, with per_token, every
    centred row's loss and reconstruction under a dictionary of all centred rows, leave-one-out
    (rows centred by their mean over the sample)."""
    unit = unit_rows(x_ND)
    n_fit = max(1, min(unit.shape[0] - 1, int(round(fit * unit.shape[0]))))
    anchors = dictionary_rows(unit[:n_fit], k, min_cosine, batch)
    _, cos = mp_cosine(unit[n_fit:], unit[anchors], k)
    if not per_token:
        return LayerSample(unit, anchors, n_fit, cos, None, None, None, None, None)
    centred_ND = x_ND.double() - x_ND.double().mean(0)
    centred = unit_rows(centred_ND)
    every = dictionary_rows(centred, k, min_cosine, batch)
    own = torch.full((unit.shape[0],), -1, dtype=torch.int64)
    own[every] = torch.arange(len(every))
    recon, loss = token_parts(centred, centred[every], own, k)
    return LayerSample(
        unit,
        anchors,
        n_fit,
        cos,
        loss,
        recon,
        x_ND.to(torch.float32).norm(dim=1),
        centred_ND.norm(dim=1).float(),
        every,
    )


def _code_agreement(ca, cb) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: Jaccard of the two support sets and cosine of the two coefficient vectors over
    the shared atoms, from the k (index, value) pairs (never a dense [tokens, atoms] matrix)."""
    tot_a, used_a = atom_totals(ca)
    tot_b, used_b = atom_totals(cb)
    match_NKK = (ca.indices.cpu()[:, :, None] == cb.indices.cpu()[:, None, :]) & used_a[:, :, None] & used_b[:, None, :]
    inter = match_NKK.sum((1, 2)).double()
    union = used_a.sum(1).double() + used_b.sum(1).double() - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    dot = (match_NKK * tot_a[:, :, None] * tot_b[:, None, :]).sum((1, 2))
    norms = ((tot_a**2) * used_a).sum(1).sqrt() * ((tot_b**2) * used_b).sum(1).sqrt()
    return jaccard, dot / norms.clamp(min=1e-30)


def pair_similarities(a: LayerSample, b: LayerSample, k: int = DEFAULT_K, measures=ITDA_MEASURES) -> dict[str, float]:
    """Every requested ITDA measure for one pair of layers (see the module docstring)."""
    out: dict[str, float] = {}
    if "itda_recon_cka" in measures:
        out["itda_recon_cka"] = gram_cka(_per_token(a.recon), _per_token(b.recon))
    if "itda_loss_profile" in measures:
        out["itda_loss_profile"] = float(spearman_grid(_per_token(a.loss)[None], _per_token(b.loss)[None])[0, 0])
    if {"itda_scaled_cka", "itda_scaled_procrustes"} & set(measures):
        exact = linear_cka(
            scaled_recon(_per_token(a.recon), _per_token(a.centred_norm)),
            scaled_recon(_per_token(b.recon), _per_token(b.centred_norm)),
        )
        for m, name in (("itda_scaled_cka", "cka"), ("itda_scaled_procrustes", "procrustes")):
            if m in measures:
                out[m] = exact[name].value
    shared = torch.unique(torch.cat([a.anchors, b.anchors]))
    need_codes = {"itda_code_overlap", "itda_code_cosine"} & set(measures)
    if need_codes:
        ca, _ = mp_cosine(a.held, a.unit[shared], k)
        cb, _ = mp_cosine(b.held, b.unit[shared], k)
        jaccard, cosine = _code_agreement(ca, cb)
        if "itda_code_overlap" in measures:
            out["itda_code_overlap"] = float(jaccard.mean())
        if "itda_code_cosine" in measures:
            out["itda_code_cosine"] = float(cosine.mean())
    if "itda_cross_recon" in measures:
        _, b_over_a = mp_cosine(b.held, b.unit[a.anchors], k)
        _, a_over_b = mp_cosine(a.held, a.unit[b.anchors], k)
        a_own, b_own = a.own_cos, b.own_cos
        out["itda_cross_recon"] = 0.5 * (
            float(b_over_a.mean() / b_own.mean().clamp(min=1e-12))
            + float(a_over_b.mean() / a_own.mean().clamp(min=1e-12))
        )
    if "itda_relative" in measures:
        ra = a.held @ a.unit[shared].T
        rb = b.held @ b.unit[shared].T
        ra = ra - ra.mean(1, keepdim=True)
        rb = rb - rb.mean(1, keepdim=True)
        out["itda_relative"] = gram_cka(ra, rb)
    return out


def itda_grids(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor] | None,
    measures=ITDA_MEASURES,
    *,
    k: int = DEFAULT_K,
    min_cosine: float = BuildConfig.DEFAULT_MIN_COSINE,
    fit: float = 0.5,
) -> dict[str, np.ndarray]:
    """[L_A, L_B] matrices of the requested ITDA measures; ys=None compares xs with itself."""
    wanted = tuple(measures)
    if "itda_fused" in wanted:  # from its parts, computed here whether asked for or not
        measures = tuple(
            dict.fromkeys([m for m in wanted if m != "itda_fused"] + [m for m in FUSED_PARTS if m in ITDA_MEASURES])
        )
    per_token = bool(set(PER_TOKEN) & set(measures))
    sa = [layer_sample(x, k, min_cosine, fit, per_token=per_token) for x in xs]
    sb = sa if ys is None else [layer_sample(y, k, min_cosine, fit, per_token=per_token) for y in ys]
    grids = {m: np.zeros((len(sa), len(sb))) for m in measures}
    for i, a in enumerate(sa):
        for j, b in enumerate(sb):
            if ys is None and j < i:
                for m in measures:
                    grids[m][i, j] = grids[m][j, i]
                continue
            for m, v in pair_similarities(a, b, k, measures).items():
                grids[m][i, j] = v
    if "itda_fused" in wanted:
        grids["norm_profile"] = spearman_grid(
            torch.stack([_per_token(s.norm) for s in sa]), torch.stack([_per_token(s.norm) for s in sb])
        )
        grids["itda_fused"] = fused_grid({m: grids[m] for m in FUSED_PARTS})
    return {m: grids[m] for m in wanted}
