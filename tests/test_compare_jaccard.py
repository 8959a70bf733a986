import numpy as np
import pytest
import torch

from itda.comparison.jaccard import jaccard, jaccard_union
from itda.comparison.layers import argmax_accuracy, monotone_correspondence, pooled_accuracy
from itda.dictionary import Dictionary, DictionaryMeta
from itda.errors import ItdaInputError


def _dict(pairs, fp="fp1", docs="docs1", tokens=1000, char_shift=0):
    n = len(pairs)
    refs = torch.tensor([[doc, pos, pos * 4, pos * 4 + 3 + char_shift, 7] for doc, pos in pairs], dtype=torch.int64)
    atoms = torch.nn.functional.normalize(torch.randn(n, 4), dim=1)
    meta = DictionaryMeta(d=4, dataset_fingerprint=fp, build={"documents_fingerprint": docs, "tokens": tokens})
    return Dictionary(atoms, refs, meta)


def test_raw_crop_and_chance():
    a = _dict([(0, 1), (0, 2), (1, 5), (2, 7)])
    b = _dict([(0, 2), (1, 5), (3, 3), (4, 4), (5, 5), (6, 6)])
    raw = jaccard(a, b)
    assert raw.value == pytest.approx(2 / 8) and raw.details["identity"] == "token"
    crop = jaccard(a, b, size="crop")  # b cropped to its first 4 atoms: overlap 2 of 6
    assert crop.value == pytest.approx(2 / 6)
    chance = jaccard(a, b, size="chance", tokens=100)
    e = 4 * 6 / 100
    j0 = e / (10 - e)
    assert chance.value == pytest.approx((0.25 - j0) / (1 - j0))


def test_token_identity_needs_same_fingerprint():
    a = _dict([(0, 1)], fp="x")
    b = _dict([(0, 1)], fp="y")
    with pytest.raises(ItdaInputError, match="same documents with the same tokenizer"):
        jaccard(a, b, identity="token")
    # auto falls back to character identities, which need the same documents
    assert jaccard(a, b).details["identity"] == "char"
    with pytest.raises(ItdaInputError, match="same documents"):
        jaccard(a, _dict([(0, 1)], fp="z", docs="other"))


def test_char_identity_matches_tokens_ending_at_the_same_character():
    a = _dict([(0, 1), (0, 2)], fp="x")
    b = _dict([(0, 1), (0, 2)], fp="y", char_shift=1)  # same positions, different char ends
    assert jaccard(a, b).value == 0.0
    c = _dict([(0, 1), (0, 9)], fp="z")
    assert jaccard(a, c).value == pytest.approx(1 / 3)


def test_model_level_union():
    a = [_dict([(0, 1), (0, 2)]), _dict([(0, 3)])]
    b = [_dict([(0, 3)]), _dict([(0, 9)])]
    sim = jaccard_union(a, b)
    assert sim.value == pytest.approx(1 / 4)


def test_argmax_accuracy_and_pooling():
    s = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.8], [0.0, 0.1, 0.7]])
    assert argmax_accuracy(s) == pytest.approx(2 / 3)
    pairs = {("a", "a"): np.eye(3), ("a", "b"): s}
    assert pooled_accuracy(pairs, self_pairs=True) == pytest.approx((1 + 2 / 3) / 2)
    assert pooled_accuracy(pairs, self_pairs=False) == pytest.approx(2 / 3)


def test_monotone_correspondence_brute_force():
    rng = np.random.default_rng(0)
    import itertools

    for la, lb in [(4, 4), (5, 3), (3, 6)]:
        s = rng.random((la, lb))
        best = max(
            (sum(s[i, j] for i, j in enumerate(js)), js)
            for js in itertools.product(range(lb), repeat=la)
            if all(js[i] <= js[i + 1] for i in range(la - 1))
        )
        got = monotone_correspondence(s)
        assert len(got) == la and all(got[i] <= got[i + 1] for i in range(la - 1))
        assert sum(s[i, j] for i, j in enumerate(got)) == pytest.approx(best[0])
