import numpy as np
import pytest
import torch
from reference_impls import mp_float64, random_unit

from itda.errors import ItdaInputError
from itda.pursuit import compute_gram, decode, matching_pursuit, orthogonal_matching_pursuit

CASES = [(64, 16, 32, 5), (200, 64, 512, 40), (33, 128, 300, 12), (16, 8, 1024, 20)]


def _first_tie_step(gap: np.ndarray, scale: np.ndarray, tol: float) -> np.ndarray:
    """Per row, the first step whose best/second-best gap is within tol (k if none)."""
    near = gap <= tol * scale[:, None]
    return np.where(near.any(1), near.argmax(1), gap.shape[1])


@pytest.mark.parametrize("B,d,N,k", CASES)
@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mp_matches_float64_textbook(B, d, N, k, backend, dtype):
    rng = np.random.default_rng(B * 7 + N)
    atoms = torch.from_numpy(random_unit(N, d, rng)).to(dtype)
    x = torch.from_numpy(rng.standard_normal((B, d)) * 3).to(dtype)
    idx, val, energy, gap = mp_float64(x.double().numpy(), atoms.double().numpy(), k)
    codes = matching_pursuit(x, atoms, k, backend=backend)
    scale = np.linalg.norm(x.double().numpy(), axis=1)
    stop = _first_tie_step(gap, scale, 1e-5)
    # float32 cannot order correlations closer than ~1e-6 |x|: rows are compared up to their
    # first near-tie of the float64 reference; such ties must be rare early on
    assert (stop >= min(k, 5)).mean() > 0.9
    got_idx, got_val = codes.indices.numpy(), codes.values.numpy()
    for row in range(B):
        s = stop[row]
        np.testing.assert_array_equal(got_idx[row, :s], idx[row, :s])
        np.testing.assert_allclose(got_val[row, :s], val[row, :s], rtol=1e-4, atol=1e-4 * scale[row])
    full = stop == k
    if full.any():
        np.testing.assert_allclose(
            codes.residual_sq.numpy()[full], energy[full], rtol=1e-3, atol=1e-3 * scale[full].max() ** 2
        )


def test_gram_free_path_equals_gram_path():
    rng = np.random.default_rng(3)
    atoms = torch.from_numpy(random_unit(700, 48, rng)).float()
    x = torch.from_numpy(rng.standard_normal((90, 48))).float()
    with_gram = matching_pursuit(x, atoms, 25, gram=compute_gram(atoms), backend="torch")
    lazy = matching_pursuit(x, atoms, 25, gram=None, backend="torch")  # N > 4B: rows on demand
    assert torch.equal(with_gram.indices, lazy.indices)
    torch.testing.assert_close(with_gram.values, lazy.values, rtol=1e-5, atol=1e-5)


def test_residual_energy_matches_explicit_residual():
    rng = np.random.default_rng(4)
    atoms = torch.from_numpy(random_unit(256, 32, rng)).float()
    x = torch.from_numpy(rng.standard_normal((50, 32))).float()
    codes = matching_pursuit(x, atoms, 10)
    r = x - decode(codes, atoms)
    torch.testing.assert_close(codes.residual_sq, (r * r).sum(1), rtol=1e-4, atol=1e-4)


def test_chunking_does_not_change_result():
    rng = np.random.default_rng(5)
    atoms = torch.from_numpy(random_unit(128, 16, rng)).float()
    x = torch.from_numpy(rng.standard_normal((77, 16))).float()
    for backend in ("torch", "numba"):
        a = matching_pursuit(x, atoms, 9, backend=backend)
        b = matching_pursuit(x, atoms, 9, backend=backend, chunk_size=10)
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_omp_residual_orthogonal_and_least_squares(backend):
    rng = np.random.default_rng(6)
    d, n, k = 40, 300, 15
    atoms = torch.from_numpy(random_unit(n, d, rng)).float()
    x = torch.from_numpy(rng.standard_normal((64, d))).float()
    codes = orthogonal_matching_pursuit(x, atoms, k, backend=backend)
    a64, x64 = atoms.double().numpy(), x.double().numpy()
    for row in range(x.shape[0]):
        sel = codes.indices[row].numpy()
        sel = sel[sel >= 0]
        assert len(set(sel.tolist())) == len(sel) == k
        coef, *_ = np.linalg.lstsq(a64[sel].T, x64[row], rcond=None)
        np.testing.assert_allclose(codes.values[row, : len(sel)].numpy(), coef, rtol=1e-3, atol=1e-4)
        resid = x64[row] - coef @ a64[sel]
        assert np.abs(a64[sel] @ resid).max() < 1e-4 * np.linalg.norm(x64[row])
        assert abs(codes.residual_sq[row].item() - resid @ resid) < 1e-3 * (x64[row] @ x64[row])


def test_omp_stops_on_dependent_atoms():
    # 3 atoms in 2-D: after 2 picks the residual is zero and the third is dependent.
    atoms = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = torch.tensor([[2.0, 1.0]])
    for backend in ("torch", "numba"):
        codes = orthogonal_matching_pursuit(x, atoms, 3, backend=backend)
        assert codes.indices[0, 2].item() == -1 and codes.values[0, 2].item() == 0.0
        torch.testing.assert_close(decode(codes, atoms), x)


def test_omp_backends_agree():
    rng = np.random.default_rng(7)
    atoms = torch.from_numpy(random_unit(200, 24, rng)).float()
    x = torch.from_numpy(rng.standard_normal((40, 24))).float()
    a = orthogonal_matching_pursuit(x, atoms, 12, backend="torch")
    b = orthogonal_matching_pursuit(x, atoms, 12, backend="numba")
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "x,atoms,k,match",
    [
        (torch.zeros(4), torch.eye(4), 2, "2-D"),
        (torch.zeros(2, 3), torch.eye(4), 2, "dimension mismatch"),
        (torch.zeros(2, 4), torch.eye(4), 0, "k must be"),
        (torch.full((2, 4), float("nan")), torch.eye(4), 2, "NaN"),
        (torch.zeros(2, 4, dtype=torch.int64), torch.eye(4), 2, "floating point"),
    ],
)
def test_bad_inputs_raise(x, atoms, k, match):
    with pytest.raises(ItdaInputError, match=match):
        matching_pursuit(x, atoms, k)


def test_leave_one_out_is_mp_over_the_dictionary_without_the_rows_own_atom():
    from itda.pursuit.leave_one_out import matching_pursuit_leave_one_out

    rng = np.random.default_rng(11)
    atoms = torch.from_numpy(random_unit(120, 24, rng)).float()
    own = torch.tensor([5, -1, 0, 119, -1, 37])
    x = torch.from_numpy(rng.standard_normal((6, 24))).float()
    x[0], x[2], x[3], x[5] = atoms[5], atoms[0], atoms[119], atoms[37] * 2.0  # rows that are (scaled) atoms
    codes = matching_pursuit_leave_one_out(x, atoms, 9, own)
    a = atoms.double().numpy()
    for row in range(6):
        keep = np.array([j for j in range(120) if j != int(own[row])])
        idx, val, energy, _ = mp_float64(x[row : row + 1].double().numpy(), a[keep], 9)
        np.testing.assert_array_equal(codes.indices[row].numpy(), keep[idx[0]])
        np.testing.assert_allclose(codes.values[row].numpy(), val[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(codes.residual_sq[row]), energy[0], rtol=1e-3, atol=1e-5)
    assert int(own[0]) not in codes.indices[0].tolist()  # without the exclusion step 1 picks the atom itself
    assert matching_pursuit(x[:1], atoms, 9).indices[0, 0] == 5


def test_gram_pool_drops_and_rebuilds_the_same_bits():
    """Grams past a GramPool's budget are dropped at trim() and rebuilt bit for bit when next read;
    a builder whose Gram is dropped between updates builds the same dictionary."""
    from itda.builder import BuildConfig, DictionaryBuilder
    from itda.pursuit import GrowingGram
    from itda.pursuit.gram import GramPool

    rng = np.random.default_rng(2)
    rows = torch.from_numpy(random_unit(700, 24, rng)).float()
    plain = GrowingGram(24)
    with GramPool(4 * 256 * 256) as pool:
        first, second = GrowingGram(24), GrowingGram(24)
    outside = GrowingGram(24)
    assert len(pool.members) == 2  # made while the pool was active
    for s, e in ((0, 100), (100, 130), (130, 400), (400, 700)):
        for g in (plain, second):
            g.append(rows[s:e])
        first.append(rows[s : min(e, 200)])
        pool.trim()
        assert first.holds_gram and not second.holds_gram  # the first fits the budget, the second not
    outside.append(rows)
    assert outside.holds_gram
    assert torch.equal(second.gram, plain.gram) and torch.equal(second.atoms, plain.atoms)
    assert second.holds_gram and pool.trim() == first.gram_bytes and not second.holds_gram

    x = torch.from_numpy(rng.standard_normal((600, 24))).float()
    cfg = BuildConfig(k=6, min_cosine=0.9, round_size=32)
    ref = DictionaryBuilder(24, cfg)
    with GramPool(0) as pool:
        dropped = DictionaryBuilder(24, cfg)
    for s in range(0, 600, 150):
        ref.update(x[s : s + 150])
        dropped.update(x[s : s + 150])
        pool.trim()
        assert not dropped.store.holds_gram
    assert torch.equal(ref.dictionary().atoms, dropped.dictionary().atoms)


def _near_atom_rows(rng: np.random.Generator, atoms: np.ndarray, b: int, noise: float) -> np.ndarray:
    """Rows near random atoms (some close enough to stop after a step or two), scaled."""
    pick = rng.integers(0, len(atoms), b)
    x = atoms[pick] + noise * rng.standard_normal((b, atoms.shape[1])) * rng.uniform(0.1, 2.0, (b, 1))
    return x * rng.uniform(0.5, 5.0, (b, 1))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_stop_cosine_ends_rows_once_their_cosine_provably_clears_it(backend):
    rng = np.random.default_rng(11)
    atoms_np = random_unit(400, 128, rng)
    x_np = _near_atom_rows(rng, atoms_np, 300, 0.08)
    atoms, x = torch.from_numpy(atoms_np).float(), torch.from_numpy(x_np).float()
    k, cos = 12, 0.9
    full = matching_pursuit(x, atoms, k, backend=backend)
    cut = matching_pursuit(x, atoms, k, backend=backend, stop_cosine=cos)
    # the stop step from the float64 textbook loop's coefficients: the first t whose removed energy
    # sum_{s<=t} val_s^2 reaches cos^2 |x|^2
    _, val, _, _ = mp_float64(x_np, atoms_np, k)
    removed = np.cumsum(val**2, 1) / (x_np**2).sum(1, keepdims=True)
    stops = np.where((removed >= cos * cos).any(1), (removed >= cos * cos).argmax(1) + 1, k)
    used = (cut.indices >= 0).sum(1).numpy()
    clear = np.abs(removed[np.arange(len(x)), np.minimum(stops, k) - 1] - cos * cos) > 1e-4  # not a float tie
    np.testing.assert_array_equal(used[clear], stops[clear])
    assert 0.2 < (used < k).mean() < 0.95  # both kinds of row occur
    for row in range(len(x)):
        u = used[row]
        assert torch.equal(cut.indices[row, :u], full.indices[row, :u])  # the same steps until it stops
        assert torch.equal(cut.values[row, :u], full.values[row, :u])
        assert (cut.indices[row, u:] == -1).all() and (cut.values[row, u:] == 0).all()
    # the stopped rows' reconstructions (float64) do clear the cosine, and so do the full ones
    for codes in (cut, full):
        recon = decode(codes, atoms).double()
        got = torch.nn.functional.cosine_similarity(recon, x.double(), dim=1).numpy()
        assert (got[used < k] >= cos - 1e-5).all()


def test_stop_cosine_backends_agree_and_refuse_exclude():
    rng = np.random.default_rng(12)
    atoms_np = random_unit(300, 128, rng)
    atoms = torch.from_numpy(atoms_np).float()
    x = torch.from_numpy(_near_atom_rows(rng, atoms_np, 200, 0.08)).float()
    a = matching_pursuit(x, atoms, 20, backend="numba", stop_cosine=0.85)
    b = matching_pursuit(x, atoms, 20, backend="torch", stop_cosine=0.85)
    assert ((a.indices >= 0).sum(1) == (b.indices >= 0).sum(1)).float().mean() > 0.98
    with pytest.raises(ItdaInputError, match="not both"):
        matching_pursuit(x, atoms, 20, exclude=torch.full((200,), -1), stop_cosine=0.85)
