"""ITDA-based layer similarity measures against float64 references written here."""

import numpy as np
import pytest
import torch
from reference_impls import csls_loops, mp_float64
from scipy.stats import spearmanr

from itda.comparison.itda_measures import ITDA_MEASURES, PER_TOKEN, itda_grids, layer_sample, pair_similarities
from itda.synthetic import synthetic_activations


def _mp(x, atoms, k):
    """float64 reference MP: (support sets, coefficient matrix [N, M], reconstruction cosines)."""
    idx, val, _, _ = mp_float64(x, atoms, k)
    n, m = x.shape[0], atoms.shape[0]
    coef = np.zeros((n, m))
    for r in range(n):
        for j, v in zip(idx[r], val[r], strict=True):
            coef[r, j] += v
    recon = coef @ atoms
    cos = (recon * x).sum(1) / (np.linalg.norm(recon, axis=1) * np.linalg.norm(x, axis=1) + 1e-300)
    return coef, cos


def _loo(f, rows, k):
    """Unit reconstructions and cosines of every row of f over the atoms f[rows], a row that is
    itself an atom encoded by the other atoms (float64 reference)."""
    q, cos = np.zeros_like(f), np.zeros(len(f))
    for r in range(len(f)):
        keep = rows[rows != r]
        coef, c = _mp(f[r : r + 1], f[keep], k)
        q[r], cos[r] = coef[0] @ f[keep], c[0]
    return q / np.linalg.norm(q, axis=1, keepdims=True), cos


@pytest.fixture(scope="module")
def two_layers():
    base = synthetic_activations(600, 16, n_features=48, active=3, seed=3).acts
    g = torch.Generator().manual_seed(1)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    other = base @ rot + 0.3 * torch.randn(600, 16, generator=g) * base.norm(dim=1, keepdim=True) / 4
    return base, other


def test_measures_match_float64_references(two_layers):
    x, y = two_layers
    k = 5
    a, b = layer_sample(x, k, 0.9), layer_sample(y, k, 0.9)
    got = pair_similarities(a, b, k)
    fx = (x / x.norm(dim=1, keepdim=True)).double().numpy()
    fy = (y / y.norm(dim=1, keepdim=True)).double().numpy()
    pa, pb = a.anchors.numpy(), b.anchors.numpy()
    assert pa.max() < 300 and pb.max() < 300  # anchors from the fit half only
    ux, uy = fx[300:], fy[300:]  # measured on the other half
    # loss profile: Spearman of (2 - 2cos)/d over every row centred by the sample mean, each row
    # encoded by a dictionary of all centred rows without its own atom (leave-one-out)
    cx, cy = (v.double().numpy() - v.double().numpy().mean(0) for v in (x, y))
    nx, ny = np.linalg.norm(cx, axis=1), np.linalg.norm(cy, axis=1)
    cx, cy = cx / nx[:, None], cy / ny[:, None]
    qa, cos_a_all = _loo(cx, a.anchors_all.numpy(), k)
    qb, cos_b_all = _loo(cy, b.anchors_all.numpy(), k)
    got_loss = spearmanr(cos_a_all, cos_b_all).statistic  # the loss is a decreasing function of cos
    assert abs(got["itda_loss_profile"] - got_loss) < 1e-3
    _, cos_a = _mp(ux, fx[pa], k)
    _, cos_b = _mp(uy, fy[pb], k)
    # shared anchors: supports and coefficient vectors over the same rows
    shared = np.unique(np.concatenate([pa, pb]))
    ca, _ = _mp(ux, fx[shared], k)
    cb, _ = _mp(uy, fy[shared], k)
    sa, sb = ca != 0, cb != 0
    overlap = np.mean((sa & sb).sum(1) / (sa | sb).sum(1))
    assert abs(got["itda_code_overlap"] - overlap) < 0.02  # float32 vs float64 MP may pick other atoms at near-ties
    cosv = np.mean((ca * cb).sum(1) / (np.linalg.norm(ca, axis=1) * np.linalg.norm(cb, axis=1)))
    assert abs(got["itda_code_cosine"] - cosv) < 0.02
    # cross reconstruction: the other layer's positions as atoms, relative to the layer's own
    _, b_over_a = _mp(uy, fy[pa], k)
    _, a_over_b = _mp(ux, fx[pb], k)
    cross = 0.5 * (b_over_a.mean() / cos_b.mean() + a_over_b.mean() / cos_a.mean())
    assert abs(got["itda_cross_recon"] - cross) < 1e-3
    # relative representations over the shared anchors, row-centred, linear CKA
    ra, rb = ux @ fx[shared].T, uy @ fy[shared].T
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    cka = np.linalg.norm(ra.T @ rb) ** 2 / (np.linalg.norm(ra.T @ ra) * np.linalg.norm(rb.T @ rb))
    assert abs(got["itda_relative"] - cka) < 1e-5
    # the same leave-one-out reconstructions, unit length, linear CKA of the two [N, d] matrices
    qa, qb = qa - qa.mean(0), qb - qb.mean(0)
    cka = np.linalg.norm(qa.T @ qb) ** 2 / (np.linalg.norm(qa.T @ qa) * np.linalg.norm(qb.T @ qb))
    assert abs(got["itda_recon_cka"] - cka) < 1e-3  # float32 MP
    # the same reconstructions at their centred rows' lengths: linear CKA and Procrustes similarity
    sa, sb = qa * nx[:, None], qb * ny[:, None]
    sa, sb = sa - sa.mean(0), sb - sb.mean(0)
    cka = np.linalg.norm(sa.T @ sb) ** 2 / (np.linalg.norm(sa.T @ sa) * np.linalg.norm(sb.T @ sb))
    assert abs(got["itda_scaled_cka"] - cka) < 1e-3
    proc = np.linalg.svd(sa.T @ sb, compute_uv=False).sum() / (np.linalg.norm(sa) * np.linalg.norm(sb))
    assert abs(got["itda_scaled_procrustes"] - proc) < 1e-3


def test_identical_layers_score_one_and_grids_are_symmetric(two_layers):
    x, y = two_layers
    grids = itda_grids([x, y], None, k=5, min_cosine=0.9)
    pairwise = [m for m in ITDA_MEASURES if m != "itda_fused"]  # itda_fused is relative to the grid
    for m in pairwise:
        s = grids[m]
        assert np.allclose(np.diag(s), 1.0, atol=1e-5), (m, s)
        assert np.allclose(s, s.T)
    s = grids["itda_fused"]
    assert np.allclose(s, s.T) and (np.diag(s) > s[[1, 0], [0, 1]]).all()
    # the measure sees through a rotation: x vs (x rotated) is as similar as x vs x
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(2)))
    g = itda_grids([x], [x @ rot], k=5, min_cosine=0.9)
    for m in pairwise:
        assert g[m][0, 0] > 0.99, m


def test_unrelated_layers_score_low(two_layers):
    x, _ = two_layers
    noise = torch.randn_like(x)
    g = itda_grids([x], [noise], k=5, min_cosine=0.9)
    for m in ("itda_loss_profile", "itda_code_overlap", "itda_relative", "itda_code_cosine", "itda_recon_cka"):
        assert g[m][0, 0] < 0.3, (m, g[m])


def test_anchor_measures_alone_skip_the_per_token_parts_and_agree(two_layers):
    x, y = two_layers
    anchor_only = ("itda_relative", "itda_code_overlap", "itda_cross_recon")
    alone = itda_grids([x], [y], anchor_only, k=5, min_cosine=0.9)
    every = itda_grids([x], [y], k=5, min_cosine=0.9)
    for m in anchor_only:
        assert alone[m][0, 0] == every[m][0, 0], m
    assert layer_sample(x, 5, 0.9, per_token=False).recon is None


def test_per_token_measures_ignore_a_shared_offset(two_layers):
    """Centring: one large vector added to every token of a layer (an outlier dimension's mean)
    changes nothing for the per-token measures; uncentred, it swamps the directions (the plain
    unit rows of the shifted layer all point along it)."""
    x, y = two_layers
    offset = (
        20
        * x.norm(dim=1).mean()
        * torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(5)), dim=0)
    )
    plain = itda_grids([x], [y], PER_TOKEN, k=5, min_cosine=0.9)
    shifted = itda_grids([x + offset], [y], PER_TOKEN, k=5, min_cosine=0.9)
    for m in PER_TOKEN:
        assert abs(shifted[m][0, 0] - plain[m][0, 0]) < 1e-3, m
    unit = torch.nn.functional.normalize(x + offset, dim=1)
    assert (unit @ unit.mean(0)).min() > 0.9  # precondition: the offset dominates every shifted unit row


def test_fused_is_the_hubness_corrected_standardised_sum_of_its_three_parts(two_layers):
    """itda_fused = csls_2(z(itda_scaled_cka) + z(itda_scaled_procrustes) + z(norm profile)), each
    [L_A, L_B] matrix standardised over its entries; the norm profile from scipy here."""
    x, y = two_layers
    xs, ys = [x, y, x * (1 + torch.rand(600, 1, generator=torch.Generator().manual_seed(7)))], [y, x]
    got = itda_grids(xs, ys, ("itda_fused",), k=5, min_cosine=0.9)
    assert list(got) == ["itda_fused"] and got["itda_fused"].shape == (3, 2)
    parts = itda_grids(xs, ys, ("itda_scaled_cka", "itda_scaled_procrustes"), k=5, min_cosine=0.9)
    parts["norm"] = np.array(
        [[spearmanr(a.norm(dim=1).numpy(), b.norm(dim=1).numpy()).statistic for b in ys] for a in xs]
    )
    want = csls_loops(sum((s - s.mean()) / s.std() for s in parts.values()), 2)
    np.testing.assert_allclose(got["itda_fused"], want, atol=1e-6)
