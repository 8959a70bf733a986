import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from itda.builder import BuildConfig, DictionaryBuilder, build_dictionary
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.pursuit import matching_pursuit
from itda.synthetic import synthetic_activations

REFS = lambda rows: torch.tensor([[r, 0, -1, -1, -1] for r in rows], dtype=torch.int64)  # noqa: E731


def _hand_batches():
    b1 = torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 0.0]])  # seeding: [1,0] twice, [0,2] once
    b2 = torch.tensor([[1.0, 1.0], [3.0, 0.1], [-1.0, 0.0]])
    b3 = torch.tensor([[1.0, -1.0], [1.0, -1.01], [2.0, -2.0]])
    return [(b1, REFS([0, 1, 2])), (b2, REFS([3, 4, 5])), (b3, REFS([6, 7, 8]))]


def test_reference_mode_hand_checked():
    d = build_dictionary(_hand_batches(), k=1, min_cosine=0.9, mode="reference")
    s = 0.5**0.5
    expected = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [s, s], [s, -s], [1.0 / np.hypot(1, 1.01), -1.01 / np.hypot(1, 1.01)], [s, -s]]
    )
    # batch 1 seeds the most frequent row first ([1,0], first seen at row 1), then [0,2];
    # batch 2 adds only [1,1] (cos 0.707); [3,0.1] and [-1,0] are within cos 0.9 of an atom;
    # batch 3: all three rows have cos 0.707 with the dictionary and all enter, duplicates too.
    torch.testing.assert_close(d.atoms, expected.float())
    assert d.refs[:, 0].tolist() == [1, 0, 3, 6, 7, 8]


def test_improved_mode_skips_in_batch_duplicates():
    d = build_dictionary(_hand_batches()[1:], k=1, min_cosine=0.9, mode="improved")
    # starts empty: batch 2 -> [1,1] then [3,0.1] (cos 0.73 with [1,1]); [-1,0] is within cos 0.9 of [3,0.1]
    # batch 3 -> [1,-1]; [1,-1.01] (cos 0.99995) and [2,-2] (exact duplicate) are skipped
    assert d.refs[:, 0].tolist() == [3, 4, 6]


def test_improved_mode_no_duplicates_and_threshold_respected():
    data = synthetic_activations(6000, 32, n_features=256, seed=1)
    d = build_dictionary(data.batches(1024), k=8, min_cosine=0.8)  # 8 contexts of 128 a batch
    cos = (d.atoms @ d.atoms.T).abs() - torch.eye(len(d))
    # atoms accepted from one batch are pairwise below the threshold cosine
    same_batch = (d.refs[:, 0, None] // 8) == (d.refs[None, :, 0] // 8)
    assert float(cos[same_batch].max()) < 0.8
    assert len(torch.unique(d.atoms, dim=0)) == len(d)


def test_deterministic():
    data = synthetic_activations(4000, 24, n_features=128, seed=2)
    a = build_dictionary(data.batches(500), k=6, min_cosine=0.85)
    b = build_dictionary(data.batches(500), k=6, min_cosine=0.85)
    assert torch.equal(a.atoms, b.atoms) and torch.equal(a.refs, b.refs)


def test_max_atoms_keeps_first_added():
    data = synthetic_activations(4000, 24, n_features=128, seed=2)
    full = build_dictionary(data.batches(500), k=6, min_cosine=0.85, mode="reference")
    capped = build_dictionary(data.batches(500), k=6, min_cosine=0.85, mode="reference", max_atoms=50)
    assert len(capped) == 50
    assert torch.equal(capped.refs, full.refs[:50])
    # the reference renormalises every atom at each addition: later additions move the last bits
    torch.testing.assert_close(capped.atoms, full.atoms[:50], rtol=0, atol=1e-6)


def test_init_continues_a_dictionary():
    data = synthetic_activations(4000, 24, n_features=128, seed=3)
    first = build_dictionary(data.batches(500, stop=2000), k=6, min_cosine=0.85)
    cont = build_dictionary(data.batches(500, start=2000), k=6, min_cosine=0.85, init=first)
    full = build_dictionary(data.batches(500), k=6, min_cosine=0.85)
    assert torch.equal(cont.atoms[: len(first)], first.atoms)
    assert torch.equal(cont.atoms, full.atoms)


def test_loss_matches_reference_formula():
    data = synthetic_activations(1500, 16, n_features=64, seed=4)
    builder = DictionaryBuilder(16, BuildConfig(k=5, threshold=0.02, early_stop=False))
    builder.update(data.acts[:500])
    x = data.acts[500:]
    dct = builder.dictionary()
    xhat = dct.reconstruct(x, 5).double()
    xd = x.double()
    loss = ((xd / xd.norm(dim=1, keepdim=True) - xhat / xhat.norm(dim=1, keepdim=True)) ** 2).mean(1)
    stats = builder.update(x)
    assert stats.candidates == int((loss > 0.02).sum())
    assert stats.mean_loss == pytest.approx(float(loss.mean()), rel=1e-4)


@pytest.mark.parametrize("mode", ["threshold", "min_cosine"])
def test_early_stop_adds_the_same_atoms(mode):
    """Ending a row's pursuit once its cosine provably clears the threshold changes no decision:
    the same atoms in the same order, bit for bit, while many rows stop early."""
    data = synthetic_activations(12000, 48, n_features=160, seed=6)
    choice = {"threshold": 0.004} if mode == "threshold" else {"min_cosine": 0.85}
    runs = {}
    for early in (True, False):
        builder = DictionaryBuilder(48, BuildConfig(k=12, early_stop=early, round_size=64, **choice))
        stats = [builder.update(x, refs) for x, refs in data.batches(1500)]
        runs[early] = (builder.dictionary(), [s.candidates for s in stats], [s.added for s in stats])
    (fast, cand_f, add_f), (full, cand_s, add_s) = runs[True], runs[False]
    assert torch.equal(fast.atoms, full.atoms) and torch.equal(fast.refs, full.refs)
    assert cand_f == cand_s and add_f == add_s and sum(add_f) > 100
    cos = BuildConfig(k=12, **choice).cosine_threshold(48)
    codes = matching_pursuit(data.acts, full.atoms, 12, stop_cosine=cos + 1e-3)
    assert ((codes.indices >= 0).sum(1) < 12).float().mean() > 0.3  # the case is not vacuous


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 0, "min_cosine": 0.5}, "k must be"),
        ({"threshold": 0.5}, "out of range"),
        ({"min_cosine": 1.5}, "out of range"),
        ({}, "exactly one"),
        ({"min_cosine": 0.5, "mode": "fast"}, "unknown mode"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ItdaInputError, match=match):
        BuildConfig(**kwargs).validate(16)


def test_bad_batches():
    b = DictionaryBuilder(4, BuildConfig(k=2, min_cosine=0.5))
    with pytest.raises(ItdaInputError, match="d=3"):
        b.update(torch.zeros(2, 3))
    with pytest.raises(ItdaInputError, match="NaN"):
        b.update(torch.tensor([[1.0, float("inf"), 0, 0]]))


def test_checkpoint_resume_in_process(tmp_path):
    data = synthetic_activations(5000, 24, n_features=128, seed=5)
    ref = build_dictionary(data.batches(500), k=6, min_cosine=0.85)
    ck = tmp_path / "ck.safetensors"

    def interrupted():
        for i, batch in enumerate(data.batches(500)):
            if i == 6:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        build_dictionary(interrupted(), k=6, min_cosine=0.85, checkpoint=ck, checkpoint_every=2)
    assert DictionaryBuilder.load_checkpoint(ck).batches_seen == 6
    resumed = build_dictionary(data.batches(500), k=6, min_cosine=0.85, checkpoint=ck, checkpoint_every=2)
    ref.save(tmp_path / "a.safetensors")
    resumed.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_checkpoint_with_other_settings_refused(tmp_path):
    data = synthetic_activations(2000, 16, n_features=64, seed=6)
    ck = tmp_path / "ck.safetensors"
    build_dictionary(data.batches(500), k=4, min_cosine=0.85, checkpoint=ck, checkpoint_every=1)
    with pytest.raises(ItdaInputError, match="different build settings"):
        build_dictionary(data.batches(500), k=5, min_cosine=0.85, checkpoint=ck, checkpoint_every=1)


CHILD = textwrap.dedent(
    """
    import sys, time
    from itda.builder import build_dictionary
    from itda.synthetic import synthetic_activations
    out, ck, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])
    data = synthetic_activations(12000, 32, n_features=256, seed=7)
    def stream():
        for batch in data.batches(500):
            time.sleep(slow)
            yield batch
    d = build_dictionary(stream(), k=8, min_cosine=0.85, checkpoint=ck if ck != "-" else None, checkpoint_every=1)
    d.save(out)
    """
)


@pytest.mark.slow
def test_killed_build_resumes_to_identical_file(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ck = tmp_path / "ck.safetensors"
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref.safetensors"), "-", "0"], check=True)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "res.safetensors"), str(ck), "0.3"])
    deadline = time.time() + 120
    while time.time() < deadline:
        if ck.exists() and DictionaryBuilder.load_checkpoint(ck).batches_seen >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = DictionaryBuilder.load_checkpoint(ck).batches_seen
    assert 4 <= seen < 24 and not (tmp_path / "res.safetensors").exists()
    subprocess.run([sys.executable, str(script), str(tmp_path / "res.safetensors"), str(ck), "0"], check=True)
    assert (tmp_path / "res.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert Dictionary.load(tmp_path / "res.safetensors").meta.build["batches"] == 24
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
