import json

import numpy as np
import pytest
from cli_helpers import synthetic_acts_file
from safetensors.torch import load_file
from typer.testing import CliRunner

from itda.cli.main import app
from itda.dictionary import Dictionary

runner = CliRunner()


@pytest.fixture()
def acts_file(tmp_path):
    return synthetic_acts_file(tmp_path / "acts.safetensors", 3000, 32, n_features=128, seed=0)


def test_build_info_encode_eval(tmp_path, acts_file):
    out = tmp_path / "d.safetensors"
    r = runner.invoke(app, ["build", str(acts_file), "--out", str(out), "--k", "8", "--min-cosine", "0.8", "-q"])
    assert r.exit_code == 0, r.output
    d = Dictionary.load(out)
    assert d.meta.k == 8 and len(d) > 0 and d.refs[0, 0] >= 0
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert json.loads(r.output)["n_atoms"] == len(d)
    codes = tmp_path / "codes.safetensors"
    r = runner.invoke(app, ["encode", str(out), str(acts_file), "--out", str(codes)])
    assert r.exit_code == 0, r.output
    t = load_file(str(codes))
    assert t["indices"].shape == (3000, 8)
    rep = tmp_path / "rep.json"
    r = runner.invoke(app, ["eval", str(out), str(acts_file), "--out", str(rep)])
    assert r.exit_code == 0, r.output
    assert 0 <= json.loads(rep.read_text())["fvu"] < 1


def test_npy_input(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.random.default_rng(0).standard_normal((500, 16)).astype(np.float16))
    r = runner.invoke(app, ["build", str(p), "--out", str(tmp_path / "d.safetensors"), "--k", "4", "-q"])
    assert r.exit_code == 0, r.output


def _bad(tmp_path, args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and match in lines[0], r.output
    return r


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, acts_file):
    out = tmp_path / "o.safetensors"
    _bad(tmp_path, ["build", str(tmp_path / "missing.npy"), "--out", str(out)], "no such activation file")
    nan = tmp_path / "nan.npy"
    a = np.ones((10, 4), np.float32)
    a[3, 1] = np.nan
    np.save(nan, a)
    _bad(tmp_path, ["build", str(nan), "--out", str(out)], "NaN or inf")
    wrong = tmp_path / "w.npy"
    np.save(wrong, np.ones((10, 4, 2), np.float32))
    _bad(tmp_path, ["build", str(wrong), "--out", str(out)], "2-D")
    _bad(tmp_path, ["build", str(acts_file), "--out", str(out), "--k", "0"], "k must be")
    _bad(tmp_path, ["build", str(acts_file), "--out", str(out), "--threshold", "3"], "out of range")
    _bad(
        tmp_path, ["build", str(acts_file), "--out", str(out), "--threshold", "0.01", "--min-cosine", "0.5"], "not both"
    )
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dimension_mismatch_and_corrupt_dictionary(tmp_path, acts_file):
    good = tmp_path / "d.safetensors"
    runner.invoke(app, ["build", str(acts_file), "--out", str(good), "--k", "4", "-q"])
    other = tmp_path / "o.npy"
    np.save(other, np.ones((5, 7), np.float32))
    _bad(tmp_path, ["encode", str(good), str(other), "--out", str(tmp_path / "c.safetensors")], "dimension mismatch")
    assert not (tmp_path / "c.safetensors").exists()
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(good.read_bytes()[:100])
    _bad(tmp_path, ["info", str(corrupt)], "bad.safetensors")


def test_failed_build_keeps_existing_dictionary(tmp_path, acts_file):
    out = tmp_path / "d.safetensors"
    runner.invoke(app, ["build", str(acts_file), "--out", str(out), "--k", "4", "-q"])
    before = out.read_bytes()
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((4, 32), np.inf, np.float32))
    _bad(tmp_path, ["build", str(nan), "--out", str(out)], "NaN or inf")
    assert out.read_bytes() == before
