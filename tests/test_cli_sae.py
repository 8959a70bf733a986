"""`itda sae train|eval` and `itda export` from the command line, and their bad inputs."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from cli_helpers import run_bad as _bad
from cli_helpers import run_ok as _ok
from cli_helpers import synthetic_acts_file
from typer.testing import CliRunner

from itda.activations.files import save_activations
from itda.cli.main import app
from itda.sae import load_sae
from itda.synthetic import synthetic_activations

runner = CliRunner()


@pytest.fixture()
def files(tmp_path):
    acts = synthetic_acts_file(tmp_path / "acts.safetensors", 6000, 32, n_features=128, seed=0)
    d = tmp_path / "d.safetensors"
    _ok(["build", str(acts), "--out", str(d), "--k", "8", "--min-cosine", "0.8", "-q"])
    return acts, d


def test_train_eval_export_from_itda_init(tmp_path, files):
    acts, d = files
    out = tmp_path / "sae.safetensors"
    r = _ok(
        [
            "sae",
            "train",
            str(acts),
            "--out",
            str(out),
            "--latents",
            "512",
            "--k",
            "8",
            "--init",
            f"itda:{d}",
            "--steps",
            "30",
            "--batch-size",
            "256",
            "-q",
        ]
    )
    assert "fvu" in r.output
    loaded = load_sae(out)
    assert loaded.sae.cfg.n_latents == 512 and loaded.meta.init["init"] == f"itda:{d}"
    assert loaded.meta.init["centre_atoms"] is True  # the default, recorded
    assert loaded.meta.train["tokens"] == 30 * 256 and 0 < loaded.meta.train["heldout"]["fvu"] < 1
    rep = tmp_path / "rep.json"
    _ok(["sae", "eval", str(out), str(acts), "--out", str(rep)])
    assert json.loads(rep.read_text())["l0"] <= 8
    _ok(["export", str(out), "--format", "saelens", "--out", str(tmp_path / "sl")])
    _ok(["export", str(out), "--format", "sparsify", "--out", str(tmp_path / "sp")])
    _ok(["export", str(d), "--format", "sparsify", "--out", str(tmp_path / "dsp")])
    x = torch.randn(10, 32)
    for folder in ("sl", "sp"):
        assert torch.allclose(load_sae(tmp_path / folder).sae.reconstruct(x), loaded.sae.reconstruct(x), atol=1e-6)
    # an exported SAE evaluates like the original
    r1 = runner.invoke(app, ["sae", "eval", str(tmp_path / "sl"), str(acts)])
    r2 = runner.invoke(app, ["sae", "eval", str(out), str(acts)])
    assert r1.output == r2.output


def test_sae_bad_inputs_exit_2(tmp_path, files):
    acts, d = files
    out = tmp_path / "sae.safetensors"
    base = ["sae", "train", str(acts), "--out", str(out), "--steps", "5", "--batch-size", "128"]
    other = synthetic_activations(1000, 16, n_features=32, seed=1)
    save_activations(tmp_path / "a16.safetensors", other.acts)
    _ok(["build", str(tmp_path / "a16.safetensors"), "--out", str(tmp_path / "d16.safetensors"), "-q"])
    _bad(base + ["--latents", "512", "--init", f"itda:{tmp_path / 'd16.safetensors'}"], "d=16")
    _bad(base + ["--latents", "4", "--k", "2", "--init", f"itda:{d}"], "--crop")
    _bad(base + ["--latents", "512", "--init", f"itda:{d}", "--fill", "zeros"], "fill rule")
    _bad(base + ["--latents", "64", "--init", "xavier"], "unknown --init")
    _bad(base + ["--latents", "64", "--k", "65"], "--k")
    nan = tmp_path / "nan.npy"
    a = np.ones((300, 32), np.float32)
    a[7, 3] = np.nan
    np.save(nan, a)
    _bad(["sae", "train", str(nan), "--out", str(out), "--latents", "64"], "NaN or inf")
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(b"not a checkpoint at all")
    _bad(base + ["--latents", "64", "--checkpoint", str(ck)], "not a readable itda SAE checkpoint")
    _bad(["sae", "eval", str(d), str(acts)], "not an SAE")
    _bad(["sae", "eval", str(tmp_path / "nope.safetensors"), str(acts)], "no such")
    (tmp_path / "mine").mkdir()
    _bad(
        ["export", str(d), "--format", "saelens", "--out", str(tmp_path / "mine")],
        "exists and is not an SAELens export",
    )
    assert not out.exists() and ck.read_bytes() == b"not a checkpoint at all"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_sae(tmp_path, files):
    acts, _ = files
    common = [
        str(acts),
        "--latents",
        "256",
        "--k",
        "8",
        "--init",
        "data",
        "--steps",
        "400",
        "--batch-size",
        "256",
        "--dead-after-tokens",
        "4096",
        "--resample",
        "itda",
        "--resample-every",
        "50",
        "-q",
    ]
    _ok(["sae", "train", *common, "--out", str(tmp_path / "whole.safetensors")])
    ck = tmp_path / "ck.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "itda.cli.main",
        "sae",
        "train",
        *common,
        "--out",
        str(tmp_path / "resumed.safetensors"),
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "20",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists() and not (tmp_path / "resumed.safetensors").exists()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = load_sae(tmp_path / "whole.safetensors").sae, load_sae(tmp_path / "resumed.safetensors").sae
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n))
    assert not ck.exists()


@pytest.mark.slow
def test_train_on_smollm2_layer_and_eval_with_ce_score(tmp_path):
    out = tmp_path / "sae.safetensors"
    _ok(
        [
            "sae",
            "train",
            "smollm2-135m",
            "--layer",
            "3",
            "--latents",
            "1152",
            "--k",
            "16",
            "--init",
            "data",
            "--steps",
            "4",
            "--batch-size",
            "512",
            "--init-sample",
            "2048",
            "--out",
            str(out),
            "-q",
        ]
    )
    loaded = load_sae(out)
    assert (
        loaded.meta.model == "smollm2-135m" and loaded.meta.hookpoint == "resid_post.3" and loaded.sae.cfg.d_in == 576
    )
    rep = tmp_path / "rep.json"
    _ok(["sae", "eval", str(out), "--tokens", "512", "--out", str(rep)])
    s = json.loads(rep.read_text())
    assert s["ce_clean"] < s["ce_zero"] and np.isfinite(s["ce_loss_score"]) and s["l0"] <= 16


def test_an_activation_file_sae_records_the_hookpoint_given(tmp_path, files):
    """--layer on an activation file records where its rows came from, so the sparsify export lands in
    layers.L (sparsify's own folder name) instead of a folder named sae."""
    from itda.sae.io import load_sae

    acts, _d = files
    out = tmp_path / "sae.safetensors"
    common = ["sae", "train", str(acts), "--latents", "64", "--k", "4", "--steps", "3", "--batch-size", "256"]
    _ok([*common, "--layer", "8", "--out", str(out), "-q"])
    assert load_sae(out).meta.hookpoint == "resid_post.8"
    _ok(["export", str(out), "--format", "sparsify", "--out", str(tmp_path / "sp")])
    assert (tmp_path / "sp" / "layers.8" / "sae.safetensors").is_file()
    r = runner.invoke(
        app, [*common, "--layer", "8", "--hookpoint", "blocks.8.hook_mlp_out", "--out", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "--hookpoint" in r.output and not (tmp_path / "x").exists()
    plain = tmp_path / "plain.safetensors"
    _ok([*common, "--out", str(plain), "-q"])
    assert load_sae(plain).meta.hookpoint is None
