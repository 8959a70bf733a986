"""Reliability: kills, interrupts, concurrent writers and a table of bad inputs (`make reliability`).

Every bad input must give one line `error: ...` and exit code 2, leave existing outputs byte for
byte as they were and leave no temporary file behind.
"""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli_helpers import synthetic_acts_file
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
    r = subprocess.run(ITDA + ["build", str(acts), "--out", str(out), "--k", "8", "--batch-size", str(BATCH), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def _build_cmd(acts, out, ck):
    return ITDA + ["build", str(acts), "--out", str(out), "--k", "8", "--batch-size", str(BATCH), "--checkpoint", str(ck),
                   "--checkpoint-every", "2", "-q"]


@pytest.mark.slow
def test_repeated_sigkill_then_resume_is_byte_identical(acts, reference_build, tmp_path):
    out, ck = tmp_path / "d.safetensors", tmp_path / "ck.safetensors"
    rng = random.Random(7)
    kills = 0
    for _ in range(KILLS + 5):
        before = ck.stat().st_mtime_ns if ck.exists() else None
        proc = subprocess.Popen(_build_cmd(acts, out, ck), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this run has written a checkpoint of its own, then kill it at a random moment
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            if ck.exists() and ck.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not out.exists() or digest(out) == digest(reference_build)  # never a partial output
        if out.exists() or kills == KILLS:
            break
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
    proc = subprocess.Popen(_build_cmd(acts, out, ck), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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


# -- bad inputs --------------------------------------------------------------------------------------
def _files(tmp_path: Path, acts: Path) -> dict:
    f = {}
    d = tmp_path / "dict.safetensors"
    assert runner.invoke(app, ["build", str(acts), "--out", str(d), "--k", "8", "--batch-size", "4000", "-q"]).exit_code == 0
    f["dict"] = d
    good = d.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    tampered = bytearray(good)
    tampered[-8:] = b"\xff" * 8  # NaN bytes into the last atom values
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    nan = np.ones((50, 48), np.float32)
    nan[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    inf = np.ones((50, 48), np.float32)
    inf[5, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    np.save(tmp_path / "zero_cols.npy", np.ones((50, 0), np.float32))
    np.save(tmp_path / "ints.npy", np.ones((50, 48), np.int32))
    np.save(tmp_path / "narrow.npy", np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    save_file({"x": torch.ones(0, 48)}, str(tmp_path / "empty.safetensors"))
    (tmp_path / "notes.txt").write_text("a user's file")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    # checkpoints as a killed build leaves them (the library keeps them; the CLI removes them on success)
    import shutil

    from itda.activations.files import load_activations
    from itda.build import build_dictionary

    narrow = load_activations(tmp_path / "narrow.npy")
    build_dictionary(narrow.batches(100), k=4, min_cosine=0.85, checkpoint=tmp_path / "ck_other.safetensors",
                     checkpoint_every=1, fingerprint={"source": narrow.fingerprint(), "d": 16, "batch_size": 100})
    data = load_activations(acts)
    keep = tmp_path / "ck_kept.safetensors"
    build_dictionary(data.batches(4000, stop=8000), k=8, min_cosine=0.85, checkpoint=keep, checkpoint_every=1,
                     fingerprint={"source": data.fingerprint(), "d": 48, "batch_size": 4000})
    shutil.copy(keep, tmp_path / "ck_kept_copy.safetensors")
    f["ck"] = tmp_path / "ck_kept_copy.safetensors"
    return f


BAD = [
    # (name, argv with {t} = tmp folder, {acts}, {dict}, expected fragment)
    ("missing activation file", ["build", "{t}/missing.npy", "--out", "{t}/o.safetensors"], "no such activation file"),
    ("truncated dictionary", ["info", "{t}/truncated.safetensors"], "not a readable safetensors file"),
    ("garbage dictionary", ["info", "{t}/garbage.safetensors"], "not a readable safetensors file"),
    ("tampered dictionary", ["info", "{t}/tampered.safetensors"], "NaN or inf"),
    ("NaN activations", ["build", "{t}/nan.npy", "--out", "{t}/o.safetensors"], "NaN or inf"),
    ("inf activations", ["build", "{t}/inf.npy", "--out", "{t}/o.safetensors"], "NaN or inf"),
    ("0 columns", ["build", "{t}/zero_cols.npy", "--out", "{t}/o.safetensors"], "0 columns"),
    ("integer activations", ["build", "{t}/ints.npy", "--out", "{t}/o.safetensors"], "floating point"),
    ("empty activations", ["build", "{t}/empty.safetensors", "--out", "{t}/o.safetensors"], "0 rows"),
    ("output is the input", ["build", "{acts}", "--out", "{acts}"], "also an input"),
    ("output is a user's file", ["build", "{acts}", "--out", "{t}/notes.txt"], "not an itda dictionary"),
    ("output is a folder", ["build", "{acts}", "--out", "{t}/folder"], "is a folder"),
    ("output under a file", ["build", "{acts}", "--out", "{t}/a_file/o.safetensors"], "Not a directory"),
    ("encode over its dictionary", ["encode", "{dict}", "{acts}", "--out", "{dict}"], "also an input"),
    ("encode k too large", ["encode", "{dict}", "{acts}", "--out", "{t}/c.safetensors", "--k", "1000000000"], "--k must be between"),
    ("encode batch size 0", ["encode", "{dict}", "{acts}", "--out", "{t}/c.safetensors", "--batch-size", "0"], "--batch-size"),
    ("eval k too large", ["eval", "{dict}", "{acts}", "--k", "1000000000"], "--k must be between"),
    ("width mismatch", ["eval", "{dict}", "{t}/narrow.npy"], "dimension mismatch"),
    ("bogus device", ["build", "{acts}", "--out", "{t}/o.safetensors", "--device", "bogus"], "not a torch device"),
    ("cuda without CUDA", ["build", "{acts}", "--out", "{t}/o.safetensors", "--device", "cuda"], "CUDA is not available"),
    ("checkpoint every 0", ["build", "{acts}", "--out", "{t}/o.safetensors", "--checkpoint", "{t}/c.ck", "--checkpoint-every", "0"], "--checkpoint-every"),
    ("checkpoint of another width", ["build", "{acts}", "--out", "{t}/o.safetensors", "--k", "4", "--batch-size", "100",
                                     "--checkpoint", "{t}/ck_other.safetensors"], "d=16"),
    ("checkpoint at another batch size", ["build", "{acts}", "--out", "{t}/o.safetensors", "--k", "8", "--batch-size", "2000",
                                          "--checkpoint", "{ck}"], "another stream"),
    ("checkpoint of another file", ["build", "{t}/narrow_copy.npy", "--out", "{t}/o.safetensors", "--k", "8", "--batch-size", "4000",
                                    "--checkpoint", "{ck}"], "checkpoint"),
    ("bad memory size", ["build", "smollm2-135m", "--layer", "1", "--out", "{t}/m", "--max-memory", "lots"], "--max-memory"),
    ("compare missing file", ["compare", "{dict}", "{t}/missing.safetensors"], "no such file"),
    ("compare truncated file", ["compare", "{dict}", "{t}/truncated.safetensors"], "not a readable safetensors file"),
    ("unknown measure", ["compare", "{dict}", "{dict}", "--measures", "cosmic"], "unknown measures"),
    ("SAE from a dictionary", ["sae", "eval", "{dict}", "{acts}"], "not an SAE"),
]


def test_bad_inputs_table(tmp_path, acts):
    f = _files(tmp_path, acts)
    np.save(tmp_path / "narrow_copy.npy", np.random.default_rng(1).standard_normal((300, 48)).astype(np.float32))
    protected = [f["dict"], acts, tmp_path / "notes.txt", f["ck"]]
    before = {p: digest(p) for p in protected}
    failures = []
    for name, argv, fragment in BAD:
        args = [a.format(t=tmp_path, acts=acts, dict=f["dict"], ck=f["ck"]) for a in argv]
        r = runner.invoke(app, args)
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        if r.exit_code != 2 or len(lines) != 1 or fragment not in lines[0] or not lines[0].startswith("error: "):
            failures.append(f"{name}: exit {r.exit_code}, output {r.output!r}")
    assert not failures, "\n".join(failures)
    assert {p: digest(p) for p in protected} == before
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "c.safetensors").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    print(f"\n{len(BAD)} bad inputs: one line, exit 2, nothing overwritten")
