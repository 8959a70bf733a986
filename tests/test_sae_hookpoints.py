"""Several hookpoints' SAEs from one forward pass (itda.train_saes, `itda sae train MODEL --layers`): each
equals the SAE one hookpoint's run trains on the same batches; under torchrun, hookpoints shared out
over ranks train the SAEs every rank trains data-parallel; checkpoints resume per hookpoint."""

import json
import os
import subprocess
import sys

import pytest
from tiny_models import sample_docs, tiny_model, word_tokenizer

import itda
from itda.configfields import FieldError
from itda.sae.io import load_sae

OPTS = dict(latents=48, k=4, steps=6, batch_size=128, init="data", lr=0.003, seed=1, init_sample=512, context=32)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@pytest.fixture(scope="module")
def model_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    tok, folder = word_tokenizer(), root / "model"
    tiny_model("llama", vocab=len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(80, seed=1)))
    return folder, corpus


def _same(a, b, tol=0.0):
    for name in PARAMS:
        x, y = getattr(a.sae, name).detach(), getattr(b.sae, name).detach()
        assert float((x - y).abs().max()) <= tol, (name, float((x - y).abs().max()))


def test_one_forward_trains_each_hookpoint_as_its_own_run(model_and_corpus, tmp_path):
    folder, corpus = model_and_corpus
    saes = itda.train_saes(str(folder), "1,2", corpus=str(corpus), out=tmp_path, progress=False, **OPTS)
    assert sorted(saes) == ["resid_post.1", "resid_post.2"]
    for layer in (1, 2):
        alone = itda.train_sae(model=str(folder), layer=layer, corpus=str(corpus), progress=False, **OPTS)
        got = load_sae(tmp_path / f"resid_post.{layer}.safetensors")
        _same(got, alone)
        assert got.meta.hookpoint == f"resid_post.{layer}" and got.meta.train["tokens"] == 6 * 128


class _Killed(RuntimeError):
    pass


def _interrupted(monkeypatch, folder, run: dict, at_call: int, error: type[BaseException]) -> dict[str, int]:
    """train_saes(**run) stopped by `error` raised in the at_call-th SaeTrainer.step call (the layers
    step in turn); the step count of each checkpoint it left."""
    from itda.sae.train import SaeTrainer

    original, calls = SaeTrainer.step, []

    def stopping(self, x):
        calls.append(1)
        if len(calls) == at_call:
            raise error
        return original(self, x)

    monkeypatch.setattr(SaeTrainer, "step", stopping)
    with pytest.raises(error):
        itda.train_saes(str(folder), "1,2", **run)
    monkeypatch.setattr(SaeTrainer, "step", original)
    return {p.name: SaeTrainer.load_checkpoint(p)[0].step_count for p in run["checkpoint"].iterdir()}


def test_a_killed_run_resumes_each_hookpoint_from_its_checkpoint(model_and_corpus, tmp_path, monkeypatch):
    """Killed inside step 4, after layer 1 wrote its step-4 checkpoint and before layer 2 did: the rerun
    starts at step 2 (layer 2's), layer 1 waits for step 4, and both SAEs equal an uninterrupted run's."""
    folder, corpus = model_and_corpus
    whole = itda.train_saes(str(folder), "1,2", corpus=str(corpus), progress=False, **OPTS)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run = dict(corpus=str(corpus), progress=False, checkpoint=ckpt, checkpoint_every=2, out=out, **OPTS)
    steps = _interrupted(monkeypatch, folder, run, 8, _Killed)  # inside layer 2's fourth step
    assert steps == {"resid_post.1.safetensors": 4, "resid_post.2.safetensors": 2}
    again = itda.train_saes(str(folder), "1,2", **run)
    for name in whole:
        _same(again[name], whole[name])
        _same(load_sae(out / f"{name}.safetensors"), whole[name])
    assert not list(ckpt.iterdir())  # a finished run removes its checkpoints


def test_bad_hookpoint_lists_are_refused(model_and_corpus):
    folder, corpus = model_and_corpus
    for layers, words in (("1", "at least two"), ("1,1", "twice")):
        with pytest.raises(FieldError, match=words):
            itda.train_saes(str(folder), layers, corpus=str(corpus), progress=False, **OPTS)
    with pytest.raises(FieldError, match="torchrun"):
        itda.train_saes(str(folder), "1,2", corpus=str(corpus), progress=False, distribute_hookpoints=True, **OPTS)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", ITDA_DIST_TIMEOUT="60")


@pytest.mark.slow
def test_hookpoints_shared_out_over_ranks_train_the_data_parallel_saes(model_and_corpus, tmp_path):
    """2 CPU ranks: --distribute-hookpoints (rank 0 trains layer 1, rank 1 layer 2, each on the whole step's
    batch) against every rank training both on its half of the batch: the same SAEs (weights to 1e-6)."""
    folder, corpus = model_and_corpus
    base = ["-m", "itda", "sae", "train", str(folder), "--layers", "1,2", "--corpus", str(corpus), "-q"]
    for name, value in OPTS.items():
        base += [f"--{name.replace('_', '-')}", str(value)]
    outs = {}
    for mode in ("ddp", "distribute"):
        outs[mode] = tmp_path / mode
        extra = ["--distribute-hookpoints"] if mode == "distribute" else []
        r = subprocess.run(
            TORCHRUN + base + ["--out", str(outs[mode])] + extra, env=ENV, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-3000:]
    for layer in (1, 2):
        name = f"resid_post.{layer}.safetensors"
        _same(load_sae(outs["distribute"] / name), load_sae(outs["ddp"] / name), tol=1e-6)


def test_the_command_writes_one_sae_per_hookpoint_and_refuses_bad_input(model_and_corpus, tmp_path):
    from cli_helpers import run_bad, run_ok

    folder, corpus = model_and_corpus
    args = ["sae", "train", str(folder), "--corpus", str(corpus), "--latents", "48", "--k", "4", "--steps", "2"]
    args += ["--batch-size", "128", "--init-sample", "256", "--context", "32", "-q"]
    out = tmp_path / "saes"
    text = run_ok(args + ["--layers", "1,2", "--out", str(out)]).output
    assert "2 SAEs trained" in text
    assert sorted(p.name for p in out.iterdir()) == ["resid_post.1.safetensors", "resid_post.2.safetensors"]
    (tmp_path / "file").write_text("mine")
    run_bad(args + ["--layers", "1,2", "--out", str(tmp_path / "file")], "is a file")
    run_bad(args + ["--layers", "1", "--out", str(out)], "at least two")
    run_bad(args + ["--layers", "1,2", "--layer", "1", "--out", str(out)], "neither --layer")
    run_bad(
        args + ["--layer", "1", "--distribute-hookpoints", "--out", str(tmp_path / "s.safetensors")], "needs --layers"
    )
    run_bad(args + ["--layers", "1,2", "--distribute-hookpoints", "--out", str(tmp_path / "d")], "torchrun")
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "d").exists()


def test_ctrl_c_saves_every_hookpoints_checkpoint_and_the_rerun_finishes(model_and_corpus, tmp_path, monkeypatch):
    folder, corpus = model_and_corpus
    whole = itda.train_saes(str(folder), "1,2", corpus=str(corpus), progress=False, **OPTS)
    ckpt = tmp_path / "ckpt"
    run = dict(corpus=str(corpus), progress=False, checkpoint=ckpt, checkpoint_every=100, **OPTS)
    steps = _interrupted(monkeypatch, folder, run, 5, KeyboardInterrupt)  # inside layer 1's third step
    assert steps == {"resid_post.1.safetensors": 2, "resid_post.2.safetensors": 2}
    again = itda.train_saes(str(folder), "1,2", **run)
    for name in whole:
        _same(again[name], whole[name])
