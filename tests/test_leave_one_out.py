"""Leave-one-out MP through the Gram kernels against a plain float64 textbook loop written here."""

import numpy as np
import pytest
import torch
from reference_impls import random_unit

from itda.errors import ItdaInputError
from itda.pursuit import compute_gram, matching_pursuit
from itda.pursuit.leave_one_out import matching_pursuit_leave_one_out


def textbook_loo(x: np.ndarray, atoms: np.ndarray, k: int, own: np.ndarray):
    """MP on explicit float64 residuals, one product with the whole dictionary per step; row b
    never picks atom own[b] (first index on ties; no atom left: index -1, value 0). Returns
    indices, values, residual energy and each step's best/second-best |correlation| gap."""
    b, n = x.shape[0], atoms.shape[0]
    idx, val, gap = np.full((b, k), -1, np.int64), np.zeros((b, k)), np.full((b, k), np.inf)
    resid = x.astype(np.float64).copy()
    for row in range(b):
        r = resid[row]
        for t in range(k):
            c = atoms @ r
            score = np.abs(c)
            if own[row] >= 0:
                score[own[row]] = -1.0
            j = int(score.argmax())
            if score[j] < 0:
                break
            if n > 1 + (own[row] >= 0):
                gap[row, t] = score[j] - np.partition(score, -2)[-2]
            idx[row, t], val[row, t] = j, c[j]
            r -= c[j] * atoms[j]
    return idx, val, (resid * resid).sum(1), gap


def _check(codes, ref, rows_tol: float = 1e-5) -> None:
    """Indices identical up to each row's first near-tie of the reference; values and residual
    energy to ~1e-6 (float32 arithmetic against float64) on rows without a near-tie."""
    idx, val, energy, gap = ref
    near = gap <= rows_tol
    clean = ~near.any(1)
    assert clean.mean() >= 0.9  # near-ties are rare: the comparison covers most rows whole
    stop = np.where(near.any(1), near.argmax(1), gap.shape[1])
    got = codes.indices.numpy()
    for row, s in enumerate(stop):
        np.testing.assert_array_equal(got[row, :s], idx[row, :s])
    np.testing.assert_allclose(codes.values.numpy()[clean], val[clean], atol=2e-6)
    np.testing.assert_allclose(codes.residual_sq.numpy()[clean], energy[clean], atol=4e-6)


def _problem(b: int, d: int, n: int, seed: int):
    """Unit rows over unit atoms; every other row is an atom itself (its own, the best match)."""
    rng = np.random.default_rng(seed)
    atoms = random_unit(n, d, rng)
    x = random_unit(b, d, rng)
    own = np.full(b, -1, np.int64)
    own[::2] = rng.choice(n, size=len(own[::2]), replace=len(own[::2]) > n)
    x[::2] = atoms[own[::2]]
    return torch.from_numpy(x).float(), torch.from_numpy(atoms).float(), torch.from_numpy(own)


@pytest.mark.parametrize("b,d,n,k", [(64, 32, 200, 12), (40, 16, 48, 16), (30, 24, 6, 15)])
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_leave_one_out_equals_the_textbook_loop(b, d, n, k, backend):
    """Rows that are atoms (their own atom the exact match) and plain rows; k beyond the atoms
    left (the last case: 5 atoms, 15 steps, atoms repeat)."""
    x, atoms, own = _problem(b, d, n, seed=b + n)
    ref = textbook_loo(x.double().numpy(), atoms.double().numpy(), k, own.numpy())
    _check(matching_pursuit_leave_one_out(x, atoms, k, own, backend=backend), ref)
    assert not (ref[0] == own.numpy()[:, None]).any()


def test_gram_free_path_and_row_chunks(monkeypatch):
    """Without a Gram matrix (budget 0) the torch kernel recomputes correlations; chunked rows
    carry their own exclusions."""
    x, atoms, own = _problem(50, 20, 90, seed=3)
    ref = textbook_loo(x.double().numpy(), atoms.double().numpy(), 10, own.numpy())
    monkeypatch.setenv("ITDA_GRAM_BUDGET", "0")
    _check(matching_pursuit(x, atoms, 10, backend="torch", exclude=own, chunk_size=7), ref)


def test_passed_gram_and_no_exclusion_is_plain_mp():
    x, atoms, own = _problem(32, 16, 64, seed=5)
    gram = compute_gram(atoms)
    loo = matching_pursuit_leave_one_out(x, atoms, 8, own, gram=gram)
    ref = textbook_loo(x.double().numpy(), atoms.double().numpy(), 8, own.numpy())
    _check(loo, ref)
    none = torch.full_like(own, -1)
    for backend in ("torch", "numba"):
        plain = matching_pursuit(x, atoms, 8, backend=backend)
        same = matching_pursuit_leave_one_out(x, atoms, 8, none, backend=backend)
        assert torch.equal(plain.indices, same.indices) and torch.equal(plain.values, same.values)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_one_atom_dictionary_leaves_own_rows_empty(backend):
    atoms = torch.tensor([[0.6, 0.8]])
    x = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    codes = matching_pursuit_leave_one_out(x, atoms, 3, torch.tensor([0, -1]), backend=backend)
    assert codes.indices.tolist() == [[-1, -1, -1], [0, 0, 0]]
    assert codes.values[0].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(codes.values[1].numpy(), [0.6, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(codes.residual_sq.numpy(), [1.0, 0.64], atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_exact_ties_pick_the_first_other_atom(backend):
    """Exactly representable atoms: a row equal to its own atom and to a duplicate of it takes the
    duplicate, then every correlation is exactly 0 and the first atom other than its own is
    taken; a zero row likewise; the textbook loop agrees index for index."""
    eye = torch.eye(4)
    atoms = torch.cat([eye, eye[:1], eye[2:3]])  # atom 4 duplicates atom 0, atom 5 atom 2
    x = torch.stack([eye[0], eye[2], torch.zeros(4), torch.zeros(4), eye[1]])
    own = torch.tensor([0, 5, 0, 3, 1])
    codes = matching_pursuit_leave_one_out(x, atoms, 3, own, backend=backend)
    idx, val, energy, _ = textbook_loo(x.double().numpy(), atoms.double().numpy(), 3, own.numpy())
    assert codes.indices.tolist() == idx.tolist() == [[4, 1, 1], [2, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    np.testing.assert_array_equal(codes.values.numpy(), val)
    np.testing.assert_array_equal(codes.residual_sq.numpy(), energy)


def test_bad_exclusions_raise():
    x, atoms = torch.zeros(3, 4), torch.eye(4)
    for own, match in ((torch.tensor([0, 1]), "shape"), (torch.tensor([0, 4, -1]), r"\[-1, 4\)")):
        with pytest.raises(ItdaInputError, match=match):
            matching_pursuit_leave_one_out(x, atoms, 2, own)
    with pytest.raises(ItdaInputError, match="integer"):
        matching_pursuit(x, atoms, 2, exclude=torch.zeros(3))


def test_per_token_parts_with_a_kept_gram_equal_the_textbook_loop():
    """token_parts over a layer's kept Gram matrix (PerTokenGrid's gram_memory) and without it: the unit
    reconstruction and loss (2 - 2 cos) / d of the float64 textbook loop, on rows without a near-tie."""
    from itda.comparison.per_token import token_parts

    x, atoms, own = _problem(300, 16, 120, seed=9)
    idx, val, _, gap = textbook_loo(x.double().numpy(), atoms.double().numpy(), 8, own.numpy())
    recon = np.einsum("bk,bkd->bd", val, atoms.double().numpy()[idx])  # no -1: every row has 8 atoms left
    cos = (recon * x.double().numpy()).sum(1) / np.linalg.norm(recon, axis=1)
    clean = ~(gap <= 1e-5).any(1)
    assert clean.mean() >= 0.9
    for gram in (None, compute_gram(atoms)):
        unit, loss = token_parts(x, atoms, own, 8, gram)
        np.testing.assert_allclose(
            unit.numpy()[clean], (recon / np.linalg.norm(recon, axis=1)[:, None])[clean], atol=1e-5
        )
        np.testing.assert_allclose(loss.numpy()[clean], ((2 - 2 * cos) / 16)[clean], atol=1e-6)
