import numpy as np
import torch
from reference_impls import mp_float64, random_unit

from itda.dictionary import Dictionary, DictionaryMeta
from itda.evaluation import evaluate
from itda.pursuit.codes import distinct_used


def test_report_matches_direct_computation():
    rng = np.random.default_rng(0)
    atoms = torch.from_numpy(random_unit(300, 24, rng)).float()
    x = torch.from_numpy(rng.standard_normal((400, 24)) + 0.5).float()
    dct = Dictionary(atoms, meta=DictionaryMeta(d=24, k=7))
    rep = evaluate(dct, [x[:150], x[150:]])
    idx, val, _, _ = mp_float64(x.numpy(), atoms.numpy(), 7)
    xhat = np.einsum("bk,bkd->bd", val, atoms.double().numpy()[idx])
    xd = x.double().numpy()
    fvu = ((xd - xhat) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    cos = (xd * xhat).sum(1) / np.linalg.norm(xd, axis=1) / np.linalg.norm(xhat, axis=1)
    assert rep.tokens == 400
    assert abs(rep.fvu - fvu) < 1e-3 * fvu
    assert abs(rep.mean_cosine - cos.mean()) < 1e-4
    assert abs(rep.normalised_loss - ((2 - 2 * cos) / 24).mean()) < 1e-5
    distinct = np.mean([len(set(r)) for r in idx])
    assert abs(rep.l0 - distinct) < 0.05
    # usage: tokens using each atom, against the float64 reference's picks (near-ties may differ)
    ref_usage = np.zeros(300, dtype=np.int64)
    for r in idx:
        ref_usage[sorted(set(r.tolist()))] += 1
    assert np.abs(rep.usage.numpy() - ref_usage).sum() <= 0.01 * ref_usage.sum()
    assert abs(rep.dead_atoms - int((ref_usage == 0).sum())) <= 2


def test_distinct_used_counts_repeats_once_and_drops_cancelled():
    idx = torch.tensor([[3, 1, 3, 2], [5, 5, 0, -1]])
    val = torch.tensor([[1.0, 2.0, -0.5, 1.0], [1.0, -1.0, 2.0, 0.0]])
    mask = distinct_used(idx, val)
    # row 0: atoms 3, 1, 2 -> 3 distinct; row 1: atom 5 cancels to 0, atom 0 used, -1 ignored
    assert mask.sum(1).tolist() == [3, 1]
    assert sorted(idx[1][mask[1]].tolist()) == [0]
