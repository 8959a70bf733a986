"""Reliability: kills, interrupts, concurrent writers, a read-only HOME, and the table of bad inputs
(`make reliability`).

Every bad input must give one line `error: ...` and exit code 2, leave every file that existed
byte for byte as it was and leave no temporary file behind; every row of the table is checked so.
The SIGKILL/resume tests of model-input builds and of SAE training live in
tests/test_build_checkpoint.py and tests/test_sae_reliability.py (also run by `make reliability`).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from cli_helpers import kill_after_checkpoints, synthetic_acts_file
from safetensors.torch import save_file
from typer.testing import CliRunner

from itda.cli.main import app
from itda.dictionary import Dictionary
from itda.pursuit.api import gram_is_cheaper

runner = CliRunner()
ITDA = [sys.executable, "-m", "itda.cli.main"]
KILLS = 10
BATCH = 250  # 160 batches, a checkpoint every 2: many more checkpoints than kills


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    return synthetic_acts_file(tmp_path_factory.mktemp("rel") / "acts.safetensors", 40_000, 48, n_features=512, seed=11)


@pytest.fixture(scope="module")
def reference_build(acts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "whole.safetensors"
    r = subprocess.run(
        ITDA + ["build", str(acts), "--out", str(out), "--k", "8", "--batch-size", str(BATCH), "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def _build_cmd(acts, out, ck):
    return ITDA + [
        "build",
        str(acts),
        "--out",
        str(out),
        "--k",
        "8",
        "--batch-size",
        str(BATCH),
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "2",
        "-q",
    ]


@pytest.mark.slow
def test_repeated_sigkill_then_resume_is_byte_identical(acts, reference_build, tmp_path):
    out, ck = tmp_path / "d.safetensors", tmp_path / "ck.safetensors"
    kills = kill_after_checkpoints(
        lambda: subprocess.Popen(_build_cmd(acts, out, ck), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ck,
        out,
        KILLS,
        wait_s=60,
    )
    assert kills == KILLS
    r = subprocess.run(_build_cmd(acts, out, ck), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(reference_build)
    assert not ck.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # temporaries of killed writers were cleaned up


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_says_so(acts, reference_build, tmp_path):
    out, ck = tmp_path / "d.safetensors", tmp_path / "ck.safetensors"
    # a shell's background jobs (CI runners, `cmd &`) start with SIGINT ignored, and Python keeps it
    # ignored: give the child the default disposition, as a terminal's Ctrl-C would find it
    proc = subprocess.Popen(
        _build_cmd(acts, out, ck),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not ck.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the build ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    outs, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, outs, err, out.exists())
    assert "interrupted" in err and "checkpoint saved" in err and len(err.strip().splitlines()) == 1
    assert ck.exists() and not out.exists()
    r = subprocess.run(_build_cmd(acts, out, ck), capture_output=True, text=True)
    assert r.returncode == 0 and digest(out) == digest(reference_build)


def test_kill_during_final_write_leaves_target_untouched(tmp_path):
    target = tmp_path / "d.safetensors"
    target.write_bytes(b"previous good output")
    script = (
        "import os, signal, sys\n"
        "from itda.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'half of a new file')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script])
    assert r.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous good output"
    assert len(list(tmp_path.glob(".d.safetensors.*.tmp"))) == 1  # the killed writer's temporary
    from itda.atomic import write_bytes_atomic

    write_bytes_atomic(target, b"next output")
    assert target.read_bytes() == b"next output"
    assert not list(tmp_path.glob(".d.safetensors.*.tmp"))  # removed: its writer is dead


def test_kill_while_writing_a_folder_output(tmp_path):
    """Folder outputs (explorer, SAE exports): a killed writer leaves the old folder whole; the
    next write removes its temporary folder and the new folder follows the umask."""
    target = tmp_path / "page"
    target.mkdir()
    (target / "data.json").write_text("old")
    script = (
        "import os, signal\n"
        "from itda.atomic import atomic_dir\n"
        f"with atomic_dir({str(target)!r}, replace_if='data.json') as tmp:\n"
        "    (tmp / 'data.json').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert (target / "data.json").read_text() == "old"
    assert len(list(tmp_path.glob(".page.*.tmp"))) == 1
    from itda.atomic import atomic_dir

    old = os.umask(0o022)
    try:
        with atomic_dir(target, replace_if="data.json") as tmp:
            (tmp / "data.json").write_text("new")
    finally:
        os.umask(old)
    assert (target / "data.json").read_text() == "new" and target.stat().st_mode & 0o777 == 0o755
    assert not list(tmp_path.glob(".page.*"))


@pytest.mark.slow
def test_two_builds_writing_one_output_leave_a_valid_file(acts, reference_build, tmp_path):
    out = tmp_path / "d.safetensors"
    cmd = ITDA + ["build", str(acts), "--out", str(out), "--k", "8", "--batch-size", str(BATCH), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        p.wait()
        assert p.returncode == 0
    assert digest(out) == digest(reference_build)
    assert len(Dictionary.load(out)) > 0


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        from itda.atomic import write_text_atomic

        write_text_atomic(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_names_the_target_not_the_temporary(tmp_path, monkeypatch):
    from itda.atomic import write_text_atomic

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError) as info:
        write_text_atomic(tmp_path / "report.json", "{}")
    assert info.value.filename == str(tmp_path / "report.json")
    assert not list(tmp_path.iterdir())


def test_mp_path_is_chosen_by_cost():
    # B = 2048, d = 2048, N = 16,384: the Gram costs about N/B = 8 products, the Gram-free path k
    assert gram_is_cheaper(2048, 16_384, 2048, 40)
    assert not gram_is_cheaper(16, 200_000, 2048, 40)  # few tokens over a huge dictionary
    assert gram_is_cheaper(4096, 500, 576, 40)


def test_dictionaries_from_one_activation_file_compare(tmp_path, acts):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out, k in ((a, "8"), (b, "4")):
        r = runner.invoke(app, ["build", str(acts), "--out", str(out), "--k", k, "--batch-size", "4000", "-q"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", str(a), str(a)])
    assert r.exit_code == 0 and "jaccard_raw      1.0000" in r.output, r.output
    r = runner.invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output


def test_extreme_finite_activations_build_the_same_dictionary(tmp_path):
    """Rows near the float32 limit: the same atoms as the unscaled rows (not one zero atom), finite FVU."""
    from itda.activations.files import load_activations
    from itda.builder import build_dictionary
    from itda.evaluation import evaluate

    x = load_activations(synthetic_acts_file(tmp_path / "a.safetensors", 2000, 24, n_features=64, seed=5)).acts
    plain = build_dictionary([x[:1000], x[1000:]], k=6, min_cosine=0.9)
    for scale in (1e30, 1e-30):
        big = build_dictionary([x[:1000] * scale, x[1000:] * scale], k=6, min_cosine=0.9)
        assert len(big) == len(plain) and torch.allclose(big.atoms, plain.atoms, atol=1e-5)
        rep, ref = evaluate(big, [x * scale], k=6), evaluate(plain, [x], k=6)
        assert np.isfinite(rep.fvu) and abs(rep.fvu - ref.fvu) < 1e-5 * max(ref.fvu, 1e-3)
        assert abs(rep.mean_cosine - ref.mean_cosine) < 1e-6


# -- the table of bad inputs ------------------------------------------------------------------------
class Case(NamedTuple):
    name: str
    argv: list[str]  # {w}: the folder of fixtures (every file there is protected), {n}: a scratch folder
    fragment: str | None  # the error line contains this; None: the command must succeed (exit 0)


def _meta_variant(src: Path, dst: Path, **changes) -> None:
    """A copy of dictionary src with metadata fields changed (and a valid checksum)."""
    from itda.tensorfile import write_tensor_file

    d = Dictionary.load(src)
    meta = {**json.loads(d.meta.to_json()), **changes}
    write_tensor_file(dst, {"atoms": d.atoms, "refs": d.refs}, "itda", json.dumps(meta))


def _sae_files(w: Path, acts: Path) -> None:
    from itda.sae.io import SaeMeta, save_sae
    from itda.sae.model import SaeConfig, TopKSAE
    from itda.sae.train import SaeTrainer, TrainConfig
    from itda.tensorfile import read_tensor_file, write_tensor_file

    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(48, 128, 8))
    save_sae(sae, w / "sae.safetensors", SaeMeta())
    header, tensors = read_tensor_file(w / "sae.safetensors")
    entry = json.loads(header["itda_sae"])
    entry["cfg"]["k"] = 1000
    write_tensor_file(w / "sae_k1000.safetensors", tensors, "itda_sae", entry)
    flipped = bytearray((w / "sae.safetensors").read_bytes())
    flipped[-60] ^= 0x01  # one mantissa bit of a weight
    (w / "sae_bitflip.safetensors").write_bytes(bytes(flipped))
    trainer = SaeTrainer(sae, TrainConfig(steps=5))
    trainer.step(torch.randn(64, 48))
    trainer.save_checkpoint(w / "ck_sae.safetensors")


def _model_files(w: Path) -> None:
    from tiny_models import saved_model_and_corpus, tiny_model, word_tokenizer

    model, corpus, _docs = saved_model_and_corpus(w, 30, seed=2)
    r = runner.invoke(
        app,
        [
            "build",
            str(model),
            "--layer",
            "1",
            "--corpus",
            str(corpus),
            "--tokens",
            "1500",
            "--k",
            "8",
            "--out",
            str(w / "mdict"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    tok = word_tokenizer()
    small = w / "smallvocab"
    tiny_model("llama", vocab=20).save_pretrained(small)  # the tokenizer's ids go past 20
    tok.save_pretrained(small)
    (w / "empty.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    (w / "bad_dataset").mkdir()
    (w / "bad_dataset" / "state.json").write_text("{")  # a saved-dataset folder, damaged


def _checkpoint_files(w: Path, acts: Path) -> None:
    from itda.activations.files import load_activations
    from itda.builder import build_dictionary

    narrow = load_activations(w / "narrow.npy")
    build_dictionary(
        narrow.batches(100),
        k=4,
        min_cosine=0.85,
        checkpoint=w / "ck_other.safetensors",
        checkpoint_every=1,
        fingerprint={"source": narrow.fingerprint(), "d": 16, "batch_size": 100},
    )
    data = load_activations(acts)
    build_dictionary(
        data.batches(1000, stop=2000),
        k=8,
        min_cosine=0.85,
        checkpoint=w / "ck_kept.safetensors",
        checkpoint_every=1,
        fingerprint={"source": data.fingerprint(), "d": 48, "batch_size": 1000},
    )


def _array_files(w: Path) -> None:
    rng = np.random.default_rng(0)
    nan = np.ones((50, 48), np.float32)
    nan[3, 3] = np.nan
    np.save(w / "nan.npy", nan)
    inf = np.ones((50, 48), np.float32)
    inf[5, 0] = np.inf
    np.save(w / "inf.npy", inf)
    np.save(w / "zero_cols.npy", np.ones((50, 0), np.float32))
    np.save(w / "ints.npy", np.ones((50, 48), np.int32))
    np.save(w / "narrow.npy", rng.standard_normal((300, 16)).astype(np.float32))
    np.save(w / "narrow_copy.npy", rng.standard_normal((300, 48)).astype(np.float32))
    save_file({"activations": torch.ones(0, 48)}, str(w / "empty.safetensors"))
    save_file({"x": torch.ones(10, 48)}, str(w / "lone.safetensors"))


def _damaged_dictionaries(w: Path) -> None:
    good = (w / "dict.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (w / "garbage.safetensors").write_bytes(b"\x00" * 100)
    tampered = bytearray(good)
    tampered[-8:] = b"\xff" * 8  # NaN bytes into the last atom values
    (w / "tampered.safetensors").write_bytes(bytes(tampered))
    flipped = bytearray(good)
    flipped[-60] ^= 0x01  # one mantissa bit of an atom: still finite and nearly unit-norm
    (w / "bitflip.safetensors").write_bytes(bytes(flipped))
    d = Dictionary.load(w / "dict.safetensors")
    atoms = d.atoms.clone()
    atoms[0, 0] = float("nan")  # written without a checksum, as an older itda did
    save_file(
        {"atoms": atoms, "refs": d.refs}, str(w / "nan_unchecked.safetensors"), metadata={"itda": d.meta.to_json()}
    )
    for name, change in (
        ("k_eight", {"k": "eight"}),
        ("k_zero", {"k": 0}),
        ("k_negative", {"k": -3}),
        ("d_string", {"d": "48"}),
        ("cosine_2", {"min_cosine": 2.0}),
        ("layer_float", {"layer": 1.5}),
    ):
        _meta_variant(w / "dict.safetensors", w / f"meta_{name}.safetensors", **change)


def _user_files(w: Path) -> None:
    (w / "notes.txt").write_text("a user's file")
    (w / "user.json").write_text('{"mine": true}\n')
    (w / "a_file").write_text("not a folder")
    (w / "folder").mkdir()
    (w / "user_dir").mkdir()
    (w / "user_dir" / "paper.tex").write_text("a user's folder")
    (w / "imp.report.json").write_text('{"someone": "else"}\n')  # beside a select --out imp.jsonl
    (w / "imp2.coverage.png").write_bytes(b"\x89PNG not itda's")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every kind of file the commands read or write, good and bad; all of them protected."""
    w = tmp_path_factory.mktemp("world")
    acts = synthetic_acts_file(w / "acts.safetensors", 3000, 48, n_features=256, seed=11)
    for name, k in (("dict", "8"), ("dict4", "4")):
        r = runner.invoke(app, ["build", str(acts), "--out", str(w / f"{name}.safetensors"), "--k", k, "-q"])
        assert r.exit_code == 0, r.output
    np.save(w / "huge.npy", _scaled(acts, 1e30))
    _array_files(w)
    _damaged_dictionaries(w)
    _sae_files(w, acts)
    _checkpoint_files(w, acts)
    _model_files(w)
    _user_files(w)
    for argv in (
        ["encode", f"{w}/dict.safetensors", str(acts), "--out", f"{w}/codes.safetensors"],
        ["eval", f"{w}/dict.safetensors", str(acts), "--out", f"{w}/report.json"],
        ["export", f"{w}/sae.safetensors", "--format", "saelens", "--out", f"{w}/saelens"],
        ["export", f"{w}/sae.safetensors", "--format", "sparsify", "--out", f"{w}/sparsify"],
    ):
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, r.output
    shutil.copy(w / "ck_kept.safetensors", w / "ck_kept_copy.safetensors")
    return w


def _scaled(acts: Path, scale: float) -> np.ndarray:
    from itda.activations.files import load_activations

    return (load_activations(acts).acts.numpy() * scale).astype(np.float32)


A, D, D4, SAE = "{w}/acts.safetensors", "{w}/dict.safetensors", "{w}/dict4.safetensors", "{w}/sae.safetensors"
MD, MODEL, CORPUS = "{w}/mdict/resid_post.1.safetensors", "{w}/tiny", "{w}/c.jsonl"
SELECT = ["select", CORPUS, "--dict", MD, "--budget", "3", "-q"]
MODEL_BUILD = ["build", MODEL, "--layer", "1", "--corpus", CORPUS, "--tokens", "600", "--context", "32", "-q"]
MODEL_COMPARE = ["compare", MODEL, MODEL, "--corpus", CORPUS, "--measures", "cka", "--out", "{n}/c"]
CASES = [
    # -- reading: files that are missing, damaged or of another kind
    Case(
        "missing activation file", ["build", "{w}/missing.npy", "--out", "{n}/o.safetensors"], "no such activation file"
    ),
    Case("truncated dictionary", ["info", "{w}/truncated.safetensors"], "not a readable safetensors file"),
    Case("garbage dictionary", ["info", "{w}/garbage.safetensors"], "not a readable safetensors file"),
    Case("NaN bytes in atoms: checksum", ["info", "{w}/tampered.safetensors"], "checksum mismatch"),
    Case("one flipped mantissa bit: checksum", ["info", "{w}/bitflip.safetensors", "--verify"], "checksum mismatch"),
    Case(
        "flipped bit refused by encode too",
        ["encode", "{w}/bitflip.safetensors", A, "--out", "{n}/c.safetensors"],
        "checksum mismatch",
    ),
    Case("NaN atoms in a file without checksum", ["info", "{w}/nan_unchecked.safetensors"], "NaN or inf"),
    Case("info --verify of a good dictionary", ["info", D, "--verify"], None),
    Case("info --verify of a good SAE", ["info", SAE, "--verify"], None),
    Case("one flipped bit in an SAE: info --verify", ["info", "{w}/sae_bitflip.safetensors", "--verify"], "checksum"),
    Case(
        "metadata k = 'eight' (encode)",
        ["encode", "{w}/meta_k_eight.safetensors", A, "--out", "{n}/c.safetensors"],
        "field 'k'",
    ),
    Case("metadata k = 'eight' (eval)", ["eval", "{w}/meta_k_eight.safetensors", A], "field 'k'"),
    Case(
        "metadata k = 'eight' (export)",
        ["export", "{w}/meta_k_eight.safetensors", "--format", "saelens", "--out", "{n}/x"],
        "field 'k'",
    ),
    Case("metadata k = 'eight' (info)", ["info", "{w}/meta_k_eight.safetensors"], "field 'k'"),
    Case("metadata k = 0", ["encode", "{w}/meta_k_zero.safetensors", A, "--out", "{n}/c.safetensors"], "field 'k'"),
    Case(
        "metadata k = -3", ["encode", "{w}/meta_k_negative.safetensors", A, "--out", "{n}/c.safetensors"], "field 'k'"
    ),
    Case("metadata d = '48'", ["info", "{w}/meta_d_string.safetensors"], "field 'd'"),
    Case("metadata min_cosine = 2", ["info", "{w}/meta_cosine_2.safetensors"], "field 'min_cosine'"),
    Case("metadata layer = 1.5", ["info", "{w}/meta_layer_float.safetensors"], "field 'layer'"),
    Case("NaN activations", ["build", "{w}/nan.npy", "--out", "{n}/o.safetensors"], "NaN or inf"),
    Case("inf activations", ["build", "{w}/inf.npy", "--out", "{n}/o.safetensors"], "NaN or inf"),
    Case("0 columns", ["build", "{w}/zero_cols.npy", "--out", "{n}/o.safetensors"], "0 columns"),
    Case("integer activations", ["build", "{w}/ints.npy", "--out", "{n}/o.safetensors"], "floating point"),
    Case("empty activations", ["build", "{w}/empty.safetensors", "--out", "{n}/o.safetensors"], "0 rows"),
    Case(
        "lone tensor not named activations",
        ["build", "{w}/lone.safetensors", "--out", "{n}/o.safetensors"],
        "named 'activations'",
    ),
    Case("a dictionary as activations", ["build", D, "--out", "{n}/o.safetensors"], "is a dictionary file of itda"),
    Case(
        "an SAE checkpoint as build checkpoint",
        ["build", A, "--out", "{n}/o.safetensors", "--checkpoint", "{w}/ck_sae.safetensors"],
        "it is an SAE checkpoint file",
    ),
    Case("SAE from a dictionary", ["sae", "eval", D, A], "not an SAE"),
    Case("SAE metadata k=1000 > 128 latents (eval)", ["sae", "eval", "{w}/sae_k1000.safetensors", A], "k"),
    Case(
        "SAE metadata k=1000 > 128 latents (export)",
        ["export", "{w}/sae_k1000.safetensors", "--format", "saelens", "--out", "{n}/sl"],
        "k",
    ),
    Case("width mismatch", ["eval", D, "{w}/narrow.npy"], "dimension mismatch"),
    Case("compare missing file", ["compare", D, "{w}/missing.safetensors"], "no such file"),
    Case("compare truncated file", ["compare", D, "{w}/truncated.safetensors"], "not a readable safetensors file"),
    # -- options out of range, refused before any work or allocation
    Case(
        "build --k 100000000 (191 GiB)", ["build", A, "--out", "{n}/o.safetensors", "--k", "100000000"], "--k 100000000"
    ),
    Case("build --k 10000000", ["build", A, "--out", "{n}/o.safetensors", "--k", "10000000"], "free on cpu"),
    Case(
        "sae train --latents 100000000",
        ["sae", "train", A, "--out", "{n}/s.safetensors", "--latents", "100000000", "--k", "8"],
        "free",
    ),
    Case(
        "encode k too large", ["encode", D, A, "--out", "{n}/c.safetensors", "--k", "1000000000"], "--k must be between"
    ),
    Case("encode batch size 0", ["encode", D, A, "--out", "{n}/c.safetensors", "--batch-size", "0"], "--batch-size"),
    Case("eval k too large", ["eval", D, A, "--k", "1000000000"], "--k must be between"),
    Case("explore --k 0", ["explore", MD, "--out", "{n}/page", "--tokens", "200", "--k", "0"], "k must be between"),
    Case("select --k 0", SELECT + ["--out", "{n}/s.jsonl", "--k", "0"], "k must be between"),
    Case(
        "context beyond the model's positions",
        [
            "build",
            MODEL,
            "--layer",
            "1",
            "--corpus",
            CORPUS,
            "--context",
            "300",
            "--tokens",
            "600",
            "-q",
            "--out",
            "{n}/m",
        ],
        "256 positions",
    ),
    Case(
        "tokenizer ids beyond the vocabulary (build)",
        ["build", "{w}/smallvocab", "--layer", "1", "--corpus", CORPUS, "--tokens", "300", "-q", "--out", "{n}/m"],
        "vocabulary",
    ),
    Case(
        "tokenizer ids beyond the vocabulary (explore)",
        ["explore", MD, "--model", "{w}/smallvocab", "--corpus", CORPUS, "--tokens", "200", "-q", "--out", "{n}/page"],
        "vocabulary",
    ),
    Case(
        "select: documents without tokens",
        ["select", "{w}/empty.jsonl", "--dict", MD, "--budget", "1", "-q", "--out", "{n}/e.jsonl"],
        "no tokens",
    ),
    Case("compare --measures ''", ["compare", A, A, "--measures", ""], "--measures is empty"),
    Case("compare --precision float16", ["compare", A, A, "--precision", "float16"], "--precision"),
    Case("unknown measure", ["compare", D, D, "--measures", "cosmic"], "unknown measures"),
    Case("bogus device", ["build", A, "--out", "{n}/o.safetensors", "--device", "bogus"], "not a torch device"),
    Case("cuda without CUDA", ["build", A, "--out", "{n}/o.safetensors", "--device", "cuda"], "CUDA is not available"),
    Case("bad memory size", ["build", MODEL, "--layer", "1", "--out", "{n}/m", "--max-memory", "lots"], "--max-memory"),
    Case(
        "--layer with an activation file",
        ["build", A, "--layer", "3", "--out", "{n}/o.safetensors"],
        "is an activation file",
    ),
    Case(
        "checkpoint every 0",
        ["build", A, "--out", "{n}/o.safetensors", "--checkpoint", "{n}/c.ck", "--checkpoint-every", "0"],
        "--checkpoint-every",
    ),
    Case(
        "checkpoint of another width",
        [
            "build",
            A,
            "--out",
            "{n}/o.safetensors",
            "--k",
            "4",
            "--batch-size",
            "100",
            "--checkpoint",
            "{w}/ck_other.safetensors",
        ],
        "d=16",
    ),
    Case(
        "checkpoint at another batch size",
        [
            "build",
            A,
            "--out",
            "{n}/o.safetensors",
            "--k",
            "8",
            "--batch-size",
            "2000",
            "--checkpoint",
            "{w}/ck_kept_copy.safetensors",
        ],
        "another stream",
    ),
    Case(
        "checkpoint of another file",
        [
            "build",
            "{w}/narrow_copy.npy",
            "--out",
            "{n}/o.safetensors",
            "--k",
            "8",
            "--batch-size",
            "1000",
            "--checkpoint",
            "{w}/ck_kept_copy.safetensors",
        ],
        "checkpoint",
    ),
    # -- command-line usage, one line like every other error
    Case("unknown option", ["build", A, "--out", "{n}/o.safetensors", "--bogus"], "No such option"),
    Case("bad choice", ["build", A, "--out", "{n}/o.safetensors", "--mode", "fastest"], "--mode"),
    Case("not a number", ["build", A, "--out", "{n}/o.safetensors", "--k", "many"], "--k"),
    Case("missing required option", ["build", A], "--out"),
    Case("unknown command", ["bulid", A], "No such command"),
    Case(
        "unknown sae option",
        ["sae", "train", A, "--out", "{n}/s.safetensors", "--latents", "64", "--bogus"],
        "No such option",
    ),
    # -- outputs: never an input, never someone else's file, never a temporary left
    Case("output is the input", ["build", A, "--out", A], "also an input"),
    Case("output is a user's file", ["build", A, "--out", "{w}/notes.txt"], "exists and is not"),
    Case("output is a folder", ["build", A, "--out", "{w}/folder"], "is a folder"),
    Case("output under a file", ["build", A, "--out", "{w}/a_file/o.safetensors"], "Not a directory"),
    Case(
        "model build into a file",
        ["build", MODEL, "--layer", "1", "--layer", "2", "--out", "{w}/notes.txt"],
        "is not a folder",
    ),
    Case("encode over its dictionary", ["encode", D, A, "--out", D], "also an input"),
    Case("encode over its activations", ["encode", D, A, "--out", A], "also an input"),
    Case("encode over a user's file", ["encode", D, A, "--out", "{w}/notes.txt"], "exists and is not"),
    Case("encode over earlier codes", ["encode", D, A, "--out", "{w}/codes.safetensors"], None),
    Case("eval --out its activations", ["eval", D, A, "--out", A], "also an input"),
    Case("eval --out its dictionary", ["eval", D, A, "--out", D], "also an input"),
    Case("eval --out another dictionary", ["eval", D, A, "--out", D4], "exists and is not"),
    Case("eval --out an activation file", ["eval", D, A, "--out", "{w}/narrow.npy"], "exists and is not"),
    Case("eval --out a user's JSON", ["eval", D, A, "--out", "{w}/user.json"], "exists and is not"),
    Case("eval --out its earlier report (same bytes)", ["eval", D, A, "--out", "{w}/report.json"], None),
    Case("sae eval --out its activations", ["sae", "eval", SAE, A, "--out", A], "also an input"),
    Case("sae eval --out its SAE", ["sae", "eval", SAE, A, "--out", SAE], "also an input"),
    Case("sae eval --out a dictionary", ["sae", "eval", SAE, A, "--out", D], "exists and is not"),
    Case("sae eval --out an eval report", ["sae", "eval", SAE, A, "--out", "{w}/report.json"], "exists and is not"),
    Case(
        "sae train --out a dictionary",
        ["sae", "train", A, "--out", D, "--latents", "64", "--k", "4", "--steps", "2"],
        "exists and is not",
    ),
    Case(
        "sae train --out its activations",
        ["sae", "train", A, "--out", A, "--latents", "64", "--k", "4"],
        "also an input",
    ),
    Case(
        "export over a user's folder",
        ["export", SAE, "--format", "saelens", "--out", "{w}/user_dir"],
        "exists and is not",
    ),
    Case(
        "export over the other format's export",
        ["export", SAE, "--format", "sparsify", "--out", "{w}/saelens"],
        "exists and is not",
    ),
    Case("export over a file", ["export", SAE, "--format", "saelens", "--out", "{w}/notes.txt"], "is a file"),
    Case("export over its earlier export", ["export", SAE, "--format", "saelens", "--out", "{w}/saelens"], None),
    Case(
        "explore over a user's folder", ["explore", MD, "--out", "{w}/user_dir", "--tokens", "200"], "exists and is not"
    ),
    Case(
        "explore into the dictionary's folder",
        ["explore", MD, "--out", "{w}/mdict", "--tokens", "200"],
        "holds the input",
    ),
    Case("select beside a user's report", SELECT + ["--out", "{w}/imp.jsonl"], "imp.report.json: exists and is not"),
    Case("select beside a user's plot", SELECT + ["--out", "{w}/imp2.jsonl"], "imp2.coverage.png: exists and is not"),
    Case("select over its corpus", SELECT + ["--out", CORPUS], "also an input"),
    Case("select over a dictionary", SELECT + ["--out", D], "exists and is not"),
    Case("compare into a user's folder", ["compare", D, D4, "--out", "{w}/user_dir"], "exists and is not"),
    Case("compare into its inputs' folder", ["compare", A, A, "--out", "{w}"], "holds the input"),
    Case("compare --out a file", ["compare", D, D4, "--out", "{w}/notes.txt"], "is a file"),
    # -- found by the audit of 2026-12-02: --checkpoint = --out, inputs under --overwrite, unchecked options
    Case(
        "build --checkpoint is --out",
        ["build", A, "--out", "{n}/o.safetensors", "--checkpoint", "{n}/o.safetensors", "--checkpoint-every", "1"],
        "--checkpoint is also an output",
    ),
    Case(
        "sae train --checkpoint is --out",
        ["sae", "train", A, "--out", "{n}/s.safetensors", "--checkpoint", "{n}/s.safetensors"]
        + ["--latents", "64", "--k", "4", "--steps", "3"],
        "--checkpoint is also an output",
    ),
    Case(
        "build --out inside the model folder, --overwrite",
        MODEL_BUILD + ["--out", MODEL + "/model.safetensors", "--overwrite"],
        "inside the input folder",
    ),
    Case(
        "sae train --out its corpus, --overwrite",
        ["sae", "train", MODEL, "--layer", "1", "--corpus", CORPUS, "--latents", "64", "--k", "4", "--steps", "3"]
        + ["--batch-size", "64", "--init-sample", "128", "--context", "32", "-q", "--out", CORPUS, "--overwrite"],
        "also an input",
    ),
    Case(
        "eval --out the model's config, --overwrite",
        ["eval", MD, "--model", MODEL, "--corpus", CORPUS, "--tokens", "200", "--context", "32", "--no-ce"]
        + ["--out", MODEL + "/config.json", "--overwrite"],
        "inside the input folder",
    ),
    Case(
        "eval --out its corpus, --overwrite",
        ["eval", MD, "--model", MODEL, "--corpus", CORPUS, "--tokens", "200", "--context", "32", "--no-ce"]
        + ["--out", CORPUS, "--overwrite"],
        "also an input",
    ),
    Case(
        "sae eval --out a file of its SAELens folder, --overwrite",
        ["sae", "eval", "{w}/saelens", A, "--out", "{w}/saelens/cfg.json", "--overwrite"],
        "inside the input folder",
    ),
    Case(
        "select --out the model's config, --overwrite",
        SELECT + ["--model", MODEL, "--out", MODEL + "/config.json", "--overwrite"],
        "inside the input folder",
    ),
    Case(
        "explore --out the model folder, --overwrite",
        ["explore", MD, "--model", MODEL, "--out", MODEL, "--tokens", "200", "--overwrite"],
        "also an input",
    ),
    Case("compare --tokens 0", MODEL_COMPARE + ["--tokens", "0"], "--tokens must be an integer >= 1"),
    Case("compare --batch-tokens 0", MODEL_COMPARE + ["--batch-tokens", "0"], "--batch-tokens must be"),
    Case("compare --max-rows 0", MODEL_COMPARE + ["--max-rows", "0"], "--max-rows must be"),
    Case("compare --k -5", MODEL_COMPARE + ["--k", "-5"], "--k must be"),
    Case("compare --cka-minibatch 0", MODEL_COMPARE + ["--cka-minibatch", "0"], "--cka-minibatch must be"),
    Case(
        "export an SAE with --k",
        ["export", SAE, "--format", "saelens", "--k", "3", "--out", "{n}/e"],
        "applies to a dictionary input only",
    ),
    Case(
        "a broken saved-dataset folder as corpus",
        ["build", MODEL, "--layer", "1", "--corpus", "{w}/bad_dataset", "--out", "{n}/m"],
        "not a readable saved dataset",
    ),
]


def _snapshot(root: Path) -> dict[Path, str]:
    return {p: digest(p) for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".itda-outputs")}


def test_bad_inputs_table(world, tmp_path):
    before = _snapshot(world)
    failures = []
    for case in CASES:
        scratch = tmp_path / f"case{CASES.index(case)}"
        scratch.mkdir()
        r = runner.invoke(app, [a.format(w=world, n=scratch) for a in case.argv])
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        if case.fragment is None:
            ok = r.exit_code == 0
        else:
            ok = (
                r.exit_code == 2
                and len(lines) == 1
                and lines[0].startswith("error: ")
                and case.fragment in lines[0]
                and not any(scratch.iterdir())
            )
        changed = [str(p) for p, h in _snapshot(world).items() if before.get(p, h) != h]
        temps = [str(p) for p in list(world.rglob(".*.tmp")) + list(scratch.rglob(".*.tmp"))]
        if not ok or changed or temps:
            failures.append(
                f"{case.name}: exit {r.exit_code}, output {r.output[-300:]!r}, changed {changed}, temporaries {temps}"
            )
    assert not failures, "\n".join(failures)
    refused = sum(c.fragment is not None for c in CASES)
    print(
        f"\n{len(CASES)} cases ({refused} refused in one line with exit 2, {len(CASES) - refused} allowed): "
        f"{len(before)} protected files unchanged, no temporaries"
    )


def _python_for(user: str) -> str | None:
    """A python3.{minor} outside /root that `user` can run, or None."""
    for cand in (f"/usr/bin/python3.{sys.version_info.minor}", f"/usr/local/bin/python3.{sys.version_info.minor}"):
        if os.path.exists(cand) and subprocess.run(["runuser", "-u", user, "--", cand, "-c", "pass"]).returncode == 0:
            return cand
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs root to run the CLI as another user",
)
def test_cli_runs_for_a_user_whose_home_is_not_writable(tmp_path):
    """As `nobody`, HOME read-only, itda installed read-only: every command works (numba compiles in memory)."""
    python = _python_for("nobody")
    if python is None:
        pytest.skip("no python3 that the user nobody can run")
    root = Path(tempfile.mkdtemp(prefix="itda-ro-"))
    try:
        root.chmod(0o777)
        home = root / "home"
        home.mkdir(mode=0o555)
        data = root / "acts.npy"
        np.save(data, np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32))
        site = [p for p in sys.path if p.endswith("site-packages")]
        env = {
            "HOME": str(home),
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1])] + site),
            "NUMBA_CACHE_DIR": "",
        }
        env.pop("NUMBA_CACHE_DIR")

        def run(*args):
            return subprocess.run(
                ["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()], python, *args],
                capture_output=True,
                text=True,
                cwd=root,
                timeout=300,
            )

        # the trap itself: numba's disk cache has nowhere to go for this user
        probe = root / "probe.py"
        probe.write_text("import numba\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n")
        probe.chmod(0o444)
        root.chmod(0o755)  # the user cannot write beside the probe either
        assert "cannot cache" in run(str(probe)).stderr
        root.chmod(0o777)
        assert run("-m", "itda", "--help").returncode == 0
        r = run("-m", "itda", "build", str(data), "--out", str(root / "d.safetensors"), "--k", "4", "-q")
        assert r.returncode == 0, r.stderr
        r = run("-m", "itda", "eval", str(root / "d.safetensors"), str(data), "--out", str(root / "r.json"))
        assert r.returncode == 0 and json.loads((root / "r.json").read_text())["fvu"] < 1, r.stderr
        from tiny_models import saved_model_and_corpus

        model, corpus, _docs = saved_model_and_corpus(root, 20, seed=1)  # transformers' loading, HOME unwritable
        for p in [model, corpus, *model.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        r = run(
            "-m",
            "itda",
            "build",
            str(model),
            "--layer",
            "1",
            "--corpus",
            str(corpus),
            "--tokens",
            "400",
            "--out",
            str(root / "m"),
            "-q",
        )
        assert r.returncode == 0 and (root / "m" / "resid_post.1.safetensors").is_file(), r.stderr
        # heatmaps: matplotlib has no cache folder either, and says nothing of it
        r = run(
            *("-m", "itda", "compare", str(model), str(model), "--corpus", str(corpus), "--measures", "cka"),
            *("--tokens", "300", "--context", "32", "--out", "cmp"),
        )
        assert r.returncode == 0 and list((root / "cmp").glob("*.png")), r.stderr
        assert "atplotlib" not in r.stderr and "cache" not in r.stderr, r.stderr
        readonly = root / "ro"
        readonly.mkdir(mode=0o555)
        r = run("-m", "itda", "build", str(data), "--out", str(readonly / "d.safetensors"))
        assert (
            r.returncode == 2
            and r.stderr.strip()
            == f"error: {readonly / 'd.safetensors'}: cannot write in {readonly} (Permission denied)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
