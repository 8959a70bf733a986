"""torchrun SAE training: 2 CPU ranks (gloo), each on its half of every batch, train the SAE one process
trains on the whole batches (weights to 1e-6), for every architecture, and resume across ranks."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import synthetic_acts_file

from itda.api import train_sae
from itda.sae.io import load_sae

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", ITDA_DIST_TIMEOUT="60")
COMMON = dict(latents=96, k=4, steps=14, batch_size=256, dead_after_tokens=1024, seed=3, init="data", lr=0.003)


def _args(acts, out, options: dict) -> list[str]:
    args = ["sae", "train", str(acts), "--out", str(out), "-q"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def _assert_same_sae(path, ref, tol=1e-6):
    got = load_sae(path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(got.sae, name).detach(), getattr(ref.sae, name).detach()
        assert (a - b).abs().max() <= tol, (name, float((a - b).abs().max()))
    assert abs(float(got.sae.threshold) - float(ref.sae.threshold)) <= tol
    assert got.meta.train["tokens"] == ref.meta.train["tokens"]
    assert abs(got.meta.train["final_train_fvu"] - ref.meta.train["final_train_fvu"]) <= 1e-5
    assert abs(got.meta.train["heldout"]["fvu"] - ref.meta.train["heldout"]["fvu"]) <= 1e-5


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    return synthetic_acts_file(tmp_path_factory.mktemp("acts") / "acts.safetensors", 6_000, 32, n_features=200, seed=2)


@pytest.mark.parametrize(
    "extra",
    [
        {"arch": "batchtopk", "resample": "itda", "resample_every": 5},  # global cut, threshold, gathered resampling
        {"arch": "matryoshka_batchtopk", "matryoshka_widths": "24,48"},  # every prefix's FVU over the whole batch
    ],
    ids=["batchtopk-resample", "matryoshka"],
)
def test_two_ranks_train_the_sae_one_process_trains(acts, tmp_path, extra):
    options = {**COMMON, **extra}
    out = tmp_path / "sae.safetensors"
    r = subprocess.run(TORCHRUN + ["-m", "itda"] + _args(acts, out, options), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = train_sae(str(acts), progress=False, device="cpu", **options)
    assert ref.meta.train["final_train_fvu"] < 0.9  # it learned something: the comparison is not of inits
    _assert_same_sae(out, ref)


def test_killed_ranks_resume_from_rank_zero_checkpoint(acts, tmp_path):
    psutil = pytest.importorskip("psutil")
    options = {**COMMON, "steps": 60, "arch": "topk"}
    out, ck = tmp_path / "sae.safetensors", tmp_path / "ck.safetensors"
    cmd = TORCHRUN + ["-m", "itda"] + _args(acts, out, options) + ["--checkpoint", str(ck), "--checkpoint-every", "5"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ck.exists(), "no checkpoint was written"
    for child in psutil.Process(proc.pid).children(recursive=True):
        os.kill(child.pid, signal.SIGKILL)
    proc.kill()
    proc.communicate(timeout=60)
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    from itda.sae.train import SaeTrainer

    trainer, _ = SaeTrainer.load_checkpoint(ck)
    assert 0 < trainer.step_count < 60
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not ck.exists()
    _assert_same_sae(out, train_sae(str(acts), progress=False, device="cpu", **options))


def test_a_batch_the_ranks_cannot_split_evenly_is_refused(acts, tmp_path):
    options = {**COMMON, "batch_size": 255}
    r = subprocess.run(
        TORCHRUN + ["-m", "itda"] + _args(acts, tmp_path / "sae.safetensors", options),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "error: --batch-size must be a multiple of the 2 ranks, got 255" in r.stderr
    assert r.stderr.count("error: --batch-size must be a multiple of the 2 ranks") == 2  # one line per rank
    assert "/itda/" not in r.stderr  # no traceback of ours (torchrun's launcher prints its own)


def test_two_ranks_train_from_a_model_each_on_its_own_contexts(tmp_path):
    """From a model: the same init sample on both ranks (the first contexts), then each rank its own contexts;
    rank 0 alone speaks and writes."""
    import json

    from tiny_models import sample_docs, tiny_model, word_tokenizer

    tok, folder = word_tokenizer(), tmp_path / "m"
    tiny_model("llama", vocab=len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(60, seed=1)))
    out = tmp_path / "sae.safetensors"
    args = ["sae", "train", str(folder), "--layer", "1", "--corpus", str(corpus), "--context", "32"]
    args += [
        "--latents",
        "64",
        "--k",
        "4",
        "--steps",
        "5",
        "--batch-size",
        "128",
        "--init-sample",
        "800",
    ]  # more than a rank's share
    r = subprocess.run(TORCHRUN + ["-m", "itda"] + args + ["--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(f"{out}: 64 latents") == 1  # one rank prints
    sae = load_sae(out)
    assert sae.meta.train["tokens"] == 5 * 128 and sae.meta.hookpoint == "resid_post.1"
    assert all(bool(torch.isfinite(getattr(sae.sae, n)).all()) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
