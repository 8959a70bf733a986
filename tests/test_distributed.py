"""torchrun scale-out: 2 CPU ranks (gloo) build the same dictionary as one process over the interleaved stream."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import synthetic_acts_file

from itda.activations.files import load_activations
from itda.builder import build_dictionary
from itda.builder.distributed import interleaved_batches
from itda.dictionary import Dictionary

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(args, port_env=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", ITDA_DIST_TIMEOUT="60")
    return TORCHRUN + ["-m", "itda"] + args, env


def _single_process(acts, batch, world=2, **kw):
    data = load_activations(acts)
    return build_dictionary(
        interleaved_batches(data.batches(batch), world), k=8, min_cosine=0.85, score_chunk=batch, **kw
    )


@pytest.fixture()
def acts(tmp_path):
    return synthetic_acts_file(tmp_path / "acts.safetensors", 30_000, 40, n_features=400, seed=5)


def test_two_ranks_equal_one_process_over_the_interleaved_stream(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    cmd, env = _torchrun(["build", str(acts), "--out", str(out), "--k", "8", "--batch-size", "700", "-q"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = Dictionary.load(out)
    ref = _single_process(acts, 700)
    assert torch.equal(d.atoms, ref.atoms) and torch.equal(d.refs, ref.refs)
    assert d.meta.build["world_size"] == 2 and d.meta.build["tokens"] == 30_000
    # the ranks really split the work: a single process with rank-sized batches differs
    alone = build_dictionary(load_activations(acts).batches(700), k=8, min_cosine=0.85)
    assert not torch.equal(alone.refs, d.refs)


def test_killed_rank_stops_the_others_and_the_rerun_completes(acts, tmp_path):
    psutil = pytest.importorskip("psutil")
    out, ck = tmp_path / "d.safetensors", tmp_path / "ck.safetensors"
    args = [
        "build",
        str(acts),
        "--out",
        str(out),
        "--k",
        "8",
        "--batch-size",
        "300",
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "1",
        "-q",
    ]
    cmd, env = _torchrun(args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ck.exists(), "no checkpoint was written"
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "itda" in " ".join(c.cmdline())]
    assert len(workers) == 2
    victim = max(workers, key=lambda c: c.pid)
    t_kill = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t_kill < 120
    assert not out.exists()
    from itda.builder import DictionaryBuilder

    DictionaryBuilder.load_checkpoint(ck)  # intact
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = _single_process(acts, 300)
    d = Dictionary.load(out)
    assert torch.equal(d.atoms, ref.atoms) and torch.equal(d.refs, ref.refs)
    assert not ck.exists()


def _model_dirs(tmp_path):
    from tiny_models import tiny_model, word_tokenizer

    tok = word_tokenizer()
    dirs = []
    for seed in (0, 1):
        p = tmp_path / f"m{seed}"
        tiny_model("llama", vocab=len(tok), seed=seed).save_pretrained(p)
        tok.save_pretrained(p)
        dirs.append(p)
    return dirs


def test_compare_over_two_ranks_equals_one_process_over_the_interleaved_chunks(tmp_path):
    import json

    import numpy as np
    from tiny_models import sample_docs

    from itda.activations.models import load_model
    from itda.comparison.pipeline import compare_models

    (ma, mb), docs = _model_dirs(tmp_path), sample_docs(40, seed=4)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    measures = (
        "cka,procrustes,relative,itda_relative,itda_loss_profile,itda_recon_cka,itda_scaled_procrustes,itda_fused,"
        "jaccard"
    )
    out = tmp_path / "cmp"
    cmd, env = _torchrun(
        [
            "compare",
            str(ma),
            str(mb),
            "--corpus",
            str(corpus),
            "--tokens",
            "3000",
            "--context",
            "32",
            "--batch-tokens",
            "512",
            "--measures",
            measures,
            "--k",
            "8",
            "--max-rows",
            "700",
            "--out",
            str(out),
            "-q",
        ]
    )
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "split over 2 ranks" in r.stdout and r.stdout.count("paired tokens") == 1  # rank 0 alone reports
    got = {
        m: np.array(json.loads((out / f"{m}.json").read_text())["matrix"])
        for m in (
            "cka",
            "cka_debiased",
            "procrustes",
            "relative",
            "itda_relative",
            "jaccard_raw",
            "jaccard_crop",
            "itda_loss_profile",
            "itda_recon_cka",
            "itda_scaled_procrustes",
            "itda_fused",
        )
    }
    kw = dict(
        tokens=3000,
        measures=[
            "cka",
            "cka_debiased",
            "procrustes",
            "relative",
            "itda_relative",
            "itda_loss_profile",
            "itda_recon_cka",
            "itda_scaled_procrustes",
            "itda_fused",
            "jaccard",
        ],
        context=32,
        batch_tokens=512,
        k=8,
        max_rows=700,
        progress=False,
    )
    lm_a, lm_b = load_model(str(ma)), load_model(str(mb))
    ref = compare_models(lm_a, lm_b, docs, list(range(len(docs))), interleave=2, **kw)
    for m in (
        "cka",
        "cka_debiased",
        "procrustes",
        "itda_loss_profile",
        "itda_recon_cka",
        "itda_scaled_procrustes",
        "itda_fused",
    ):  # up to summation order
        np.testing.assert_allclose(got[m], ref.matrices[m], rtol=1e-9, atol=1e-12)
    for m in ("relative", "itda_relative", "jaccard_raw", "jaccard_crop"):  # same rows, same dictionaries
        np.testing.assert_array_equal(got[m], ref.matrices[m])
    # both ranks' chunks are in: rank 0 reports the paired tokens of the whole stream
    assert f"{ref.paired_tokens} paired tokens" in r.stdout and ref.paired_tokens > 2000
    assert all(len(d) > 8 for d in ref.dictionaries_a)
