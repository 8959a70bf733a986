import numpy as np
import pytest
from reference_impls import csls_loops

from itda.comparison.hubness import csls


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (1, 4), (4, 1), (3, 3)])
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_csls_matches_its_definition(shape, k):
    s = np.random.default_rng(k).normal(size=shape)
    np.testing.assert_allclose(csls(s, k), csls_loops(s, k), atol=1e-12)


def test_k0_is_the_identity_and_symmetric_stays_symmetric():
    s = np.random.default_rng(0).normal(size=(6, 6))
    assert np.array_equal(csls(s, 0), s)
    sym = s + s.T
    np.testing.assert_allclose(csls(sym), csls(sym).T, atol=1e-12)


def test_a_hub_layer_no_longer_takes_every_row():
    """A layer that is similar to every layer of the other model (a hub) wins every plain argmax;
    after CSLS each layer finds its own partner, whose similarity stands out against both sides."""
    true = 0.6 * np.eye(6) + 0.05 * np.random.default_rng(1).random((6, 6))
    hubbed = true.copy()
    hubbed[:, 2] += 0.7  # column 2 similar to every row
    assert (hubbed.argmax(1) == 2).all()
    assert (csls(hubbed).argmax(1) == np.arange(6)).all()
    assert (csls(hubbed).argmax(0) == np.arange(6)).all()


def test_a_nan_entry_leaves_the_rest_of_the_matrix_alone():
    s = np.random.default_rng(2).normal(size=(4, 5))
    s[1, 3] = np.nan
    got = csls(s)
    assert np.isnan(got[1]).all() and np.isnan(got[:, 3]).all()
    keep_r, keep_c = [0, 2, 3], [0, 1, 2, 4]
    want = csls_loops(np.nan_to_num(s, nan=-np.inf), 2)  # a NaN ranks last in numpy's sort
    np.testing.assert_allclose(got[np.ix_(keep_r, keep_c)], want[np.ix_(keep_r, keep_c)], atol=1e-12)
