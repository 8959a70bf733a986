"""Model-input builds with --checkpoint: interrupted anywhere, resumed byte-identical; foreign checkpoints refused."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import run_bad
from tiny_models import sample_docs, tiny_model, word_tokenizer
from typer.testing import CliRunner

import itda.builder.from_model as fm
from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import load_model
from itda.builder import BuildConfig, builder_class
from itda.cli.main import app
from itda.dictionary import Dictionary
from itda.tensorfile import read_tensor_file

ITDA = [sys.executable, "-m", "itda.cli.main"]
HPS = [Hookpoint("resid_post", 1), Hookpoint("resid_post", 3)]
KILLS = 10


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def digests(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved in shards (layer-wise loadable) and a JSONL corpus: (folder, corpus)."""
    root = tmp_path_factory.mktemp("ckmodel")
    tok = word_tokenizer()
    folder = root / "tiny"
    tiny_model("llama", vocab=len(tok)).save_pretrained(folder, max_shard_size="40KB")
    tok.save_pretrained(folder)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(60, seed=3)))
    return folder, corpus


def _library_build(lm, contexts, mode, out, **kw):
    config = BuildConfig(k=8, min_cosine=0.9, mode=mode)
    result = fm.build_from_model(lm, HPS, contexts, config, corpus_name="c", batch_contexts=3, progress=False, **kw)
    out.mkdir(exist_ok=True)
    fm.save_dictionaries(result, out)
    return result


def _raise_on_call(monkeypatch, owner, name, at):
    """Make the `at`-th call of owner.name raise KeyboardInterrupt (a Ctrl-C at that moment)."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _steps_in(ck: Path) -> int:
    header, _ = read_tensor_file(ck)
    return json.loads(header["itda_model_checkpoint"])["steps"]


@pytest.mark.parametrize(
    "layerwise,mode,where",
    [
        (False, "improved", "update"),
        (False, "reference", "forward"),
        (True, "improved", "forward"),
        (True, "reference", "update"),
    ],
)
def test_interrupted_library_build_resumes_byte_identical(tiny, tmp_path, monkeypatch, layerwise, mode, where):
    folder, corpus = tiny
    lm = load_model(str(folder), layerwise=layerwise, max_layer=3)
    assert (lm.layerwise is not None) == layerwise
    contexts = load_contexts(corpus, lm.tokenizer, tokenizer_name=lm.tokenizer_name, tokens=1100, context=32)[1]
    n_batches = -(-len(contexts) // 3)
    assert n_batches >= 8
    whole = _library_build(lm, contexts, mode, tmp_path / "whole")
    ck = tmp_path / "ck.safetensors"
    # Ctrl-C inside a step: during the 6th forward, or in the second hookpoint's update of the 6th step
    # (the first hookpoint's builder has taken that step: the checkpoint must hold the state before it)
    if where == "forward":
        _raise_on_call(monkeypatch, fm._Stream, "batch", 6)
    else:
        _raise_on_call(monkeypatch, builder_class(mode), "update", 12)
    with pytest.raises(KeyboardInterrupt):
        _library_build(lm, contexts, mode, tmp_path / "cut", checkpoint=ck, checkpoint_every=3)
    monkeypatch.undo()
    assert _steps_in(ck) == 5 and not (tmp_path / "cut").exists()
    forwarded = []
    real_batch = fm._Stream.batch
    monkeypatch.setattr(fm._Stream, "batch", lambda self, b: forwarded.append(b) or real_batch(self, b))
    resumed = _library_build(lm, contexts, mode, tmp_path / "resumed", checkpoint=ck, checkpoint_every=3)
    assert forwarded == list(range(5, n_batches))  # the done batches were skipped, not forwarded again
    assert digests(tmp_path / "resumed") == digests(tmp_path / "whole") and len(digests(tmp_path / "whole")) == 2
    assert all(len(d) > 8 for d in whole.dictionaries.values())
    assert resumed.tokens < whole.tokens  # this run streamed only the rest


def test_restored_builder_has_the_same_gram_bits():
    """The improved builder's Gram matrix is rebuilt bit for bit by replaying the original appends
    (with this CPU's BLAS, one product over all atoms gives other bits, so other MP decisions)."""
    g = torch.Generator().manual_seed(1)
    b = builder_class("improved")(32, BuildConfig(k=4, min_cosine=0.99, round_size=7))
    for _ in range(6):
        b.update(torch.randn(50, 32, generator=g))
    tensors, entry = b.state()
    assert len(tensors["appends"]) > 20 and b.size > 100
    again = type(b).from_state(tensors, entry, "test")
    assert torch.equal(again.store.atoms, b.store.atoms) and torch.equal(again.store.gram, b.store.gram)
    assert torch.equal(again.refs(), b.refs()) and again.batches_seen == 6 and again.tokens_seen == 300


def _cli_args(folder, corpus, out, ck=None, layers=(1, 3), tokens=6000, k=8):
    args = [
        "build",
        str(folder),
        *sum((["--layer", str(L)] for L in layers), []),
        "--corpus",
        str(corpus),
        "--tokens",
        str(tokens),
        "--context",
        "32",
        "--batch-tokens",
        "192",
        "--k",
        str(k),
        "--out",
        str(out),
        "-q",
    ]
    return args + (["--checkpoint", str(ck), "--checkpoint-every", "1"] if ck else [])


@pytest.fixture(scope="module")
def cli_reference(tiny, tmp_path_factory):
    """The uninterrupted CLI build's output files: {name: sha256}."""
    folder, corpus = tiny
    out = tmp_path_factory.mktemp("ckref") / "whole"
    r = CliRunner().invoke(app, _cli_args(folder, corpus, out))
    assert r.exit_code == 0, r.output
    return digests(out)


def _wait_for_new_checkpoint(running, ck, before, timeout=60):
    deadline = time.time() + timeout
    while running() and time.time() < deadline:
        if ck.exists() and ck.stat().st_mtime_ns != before:
            return True
        time.sleep(0.01)
    return False


def _cli_process(args):
    """Body of a forked CLI process: `itda ARGS`, output discarded, exit with its code."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from itda.cli.main import app

    try:
        app(args, prog_name="itda")
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)
    os._exit(0)


def _cli_processes():
    """Start CLI processes forked from a server that has imported itda, torch and transformers but run
    nothing (a fresh interpreter pays ~3 s of imports; these start at once)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["itda.cli.main", "transformers.models.llama.modeling_llama", __name__])
    return lambda args: ctx.Process(target=_cli_process, args=(args,), daemon=True)


@pytest.mark.slow
def test_repeated_sigkill_of_a_model_build_then_resume_is_byte_identical(tiny, cli_reference, tmp_path):
    folder, corpus = tiny
    out, ck = tmp_path / "out", tmp_path / "ck.safetensors"
    args = _cli_args(folder, corpus, out, ck)
    process = _cli_processes()
    rng, kills = random.Random(7), 0
    for _ in range(KILLS + 5):
        before = ck.stat().st_mtime_ns if ck.exists() else None
        proc = process(args)
        proc.start()
        _wait_for_new_checkpoint(proc.is_alive, ck, before)  # a checkpoint of its own, then a random moment
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.is_alive():
            proc.kill()  # SIGKILL
            kills += 1
        proc.join()
        assert proc.exitcode in (0, -signal.SIGKILL), proc.exitcode  # killed, or done: never an error
        got = digests(out) if out.exists() else {}
        assert all(got[name] == cli_reference[name] for name in got)  # never a partial output
        if kills == KILLS or proc.exitcode == 0:
            break
    assert kills >= 1  # on a loaded machine a run may finish between kills: its output is checked below
    if proc.exitcode != 0:
        assert ck.exists()
        cmd = ITDA + args  # the resume: the real command line, in a fresh interpreter
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert digests(out) == cli_reference
    assert not ck.exists() and not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.slow
def test_sigint_saves_a_model_checkpoint_and_says_so(tiny, cli_reference, tmp_path):
    folder, corpus = tiny
    out, ck = tmp_path / "out", tmp_path / "ck.safetensors"
    cmd = ITDA + _cli_args(folder, corpus, out, ck)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert _wait_for_new_checkpoint(lambda: proc.poll() is None, ck, None), (
        "the build ended before it could be interrupted"
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "interrupted" in err and f"checkpoint saved at {ck}" in err and len(err.strip().splitlines()) == 1
    assert ck.exists() and not out.exists() and _steps_in(ck) >= 1
    r = CliRunner().invoke(app, cmd[len(ITDA) :])  # the same command resumes (here in-process)
    assert r.exit_code == 0, r.output
    assert digests(out) == cli_reference and not ck.exists()


def test_foreign_checkpoints_are_refused_and_nothing_is_touched(tiny, tmp_path, monkeypatch):
    folder, corpus = tiny
    out, ck = tmp_path / "d.safetensors", tmp_path / "ck.safetensors"
    args = _cli_args(folder, corpus, out, layers=(2,), tokens=2000)
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 0
    whole = digest(out)
    out.write_bytes(b"")  # an output from before; refusals must leave it as it is
    _raise_on_call(monkeypatch, fm._Stream, "batch", 4)
    r = runner.invoke(app, args + ["--checkpoint", str(ck), "--overwrite"])
    assert r.exit_code == 130 and f"checkpoint saved at {ck}" in r.output and _steps_in(ck) == 3
    monkeypatch.undo()
    before = digest(ck)
    for option, value, what in [("--layer", "1", "hookpoints"), ("--tokens", "1500", "tokens"), ("--k", "6", "k")]:
        i = args.index(option)
        bad = args[: i + 1] + [value] + args[i + 2 :]
        r = run_bad(bad + ["--checkpoint", str(ck), "--overwrite"], "checkpoint was made with another build")
        assert f"differs in {what}" in r.output or f", {what}" in r.output, r.output
        assert digest(ck) == before and out.read_bytes() == b""
    run_bad(args + ["--checkpoint", str(out), "--overwrite"], "--out is also an input")
    folder_out = tmp_path / "f"
    run_bad(
        _cli_args(folder, corpus, folder_out, folder_out / "resid_post.3.safetensors", tokens=2000),
        "--checkpoint is also an output",
    )
    assert not folder_out.exists() and out.read_bytes() == b""
    r = runner.invoke(app, args + ["--checkpoint", str(ck), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert digest(out) == whole and not ck.exists()


@pytest.mark.slow
def test_torchrun_build_killed_and_resumed_equals_one_process_interleaved(tiny, tmp_path):
    psutil = pytest.importorskip("psutil")
    folder, corpus = tiny
    out, ck = tmp_path / "out", tmp_path / "ck.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "itda"]
    cmd += _cli_args(folder, corpus, out, ck, tokens=3000)
    env = dict(os.environ, OMP_NUM_THREADS="1", ITDA_DIST_TIMEOUT="60")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for_new_checkpoint(lambda: proc.poll() is None, ck, None, timeout=120), "no checkpoint was written"
    parent = psutil.Process(proc.pid)
    for p in [parent] + parent.children(recursive=True):  # torchrun and both ranks
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    assert not out.exists() and _steps_in(ck) >= 1
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not ck.exists()
    lm = load_model(str(folder))
    contexts = load_contexts(corpus, lm.tokenizer, tokenizer_name=lm.tokenizer_name, tokens=3000, context=32)[1]
    config = BuildConfig(k=8, min_cosine=0.85)
    for interleave, name in [(2, "two"), (1, "one")]:
        res = fm.build_from_model(
            lm, HPS, contexts, config, corpus_name=str(corpus), batch_contexts=6, progress=False, interleave=interleave
        )
        (tmp_path / name).mkdir()
        fm.save_dictionaries(res, tmp_path / name)
    assert digests(out) == digests(tmp_path / "two") and len(digests(out)) == 2
    # the ranks really split the work: one process over single batches builds other dictionaries
    two, one = (Dictionary.load(tmp_path / n / "resid_post.3.safetensors") for n in ("two", "one"))
    assert two.meta.build["world_size"] == 2 and not torch.equal(two.refs, one.refs)
