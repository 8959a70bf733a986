"""One pipeline per job: `itda eval`, `itda sae train|eval`, `itda explore` and `itda select` run the itda.api
function a Python user calls, so both give the same results (byte for byte where files are written)."""

import json

import pytest
from cli_helpers import run_ok, synthetic_acts_file

import itda
from itda.activations.files import load_activations
from itda.builder import BuildConfig
from itda.dictionary import DEFAULT_K, Dictionary, DictionaryMeta
from itda.errors import ItdaInputError
from itda.sae import load_sae

TRAIN = dict(latents=64, k=4, steps=12, batch_size=128, seed=3)


def _train_args(source, out) -> list[str]:
    opts = [f"--{key.replace('_', '-')}={value}" for key, value in TRAIN.items()]
    return ["sae", "train", str(source), "--out", str(out), *opts, "-q"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    return synthetic_acts_file(tmp_path_factory.mktemp("acts") / "acts.safetensors", 3000, 16, n_features=32, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its corpus and a dictionary built on it at resid_post.1."""
    from tiny_models import saved_model_and_corpus

    root = tmp_path_factory.mktemp("tiny")
    model, corpus, _docs = saved_model_and_corpus(root, 30, seed=4)
    d = root / "d.safetensors"
    run_ok(
        ["build", str(model), "-l", "1", "--corpus", str(corpus), "--tokens", "1200", "--context", "32"]
        + ["-o", str(d)]
    )
    return model, corpus, d


def test_one_named_default_k():
    assert DictionaryMeta(d=1).k == BuildConfig().k == DEFAULT_K


def test_sae_train_on_a_file_is_itda_train_sae(tmp_path, acts):
    cli, api = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    run_ok(_train_args(acts, cli))
    loaded = itda.train_sae(str(acts), out=api, progress=False, **TRAIN)
    assert cli.read_bytes() == api.read_bytes()
    assert loaded.meta.train["tokens"] == 12 * 128 and "heldout" in loaded.meta.train
    in_memory = tmp_path / "tensor.safetensors"
    itda.train_sae(load_activations(acts).acts, out=in_memory, progress=False, **TRAIN)  # same rows, same SAE
    assert in_memory.read_bytes() == cli.read_bytes()


def test_sae_train_refuses_in_one_line_naming_the_field(acts):
    from itda.configfields import FieldError

    with pytest.raises(FieldError, match="^checkpoint_every must be >= 1 with checkpoint$"):
        itda.train_sae(str(acts), checkpoint="ck", checkpoint_every=0, **TRAIN)
    with pytest.raises(FieldError, match="held-out row"):
        itda.train_sae(str(acts), holdout=0.0004, progress=False, **TRAIN)
    with pytest.raises(ItdaInputError, match="unknown option 'bogus'"):
        itda.train_sae(str(acts), bogus=1, **TRAIN)


def test_eval_prints_the_api_reports(tmp_path, acts):
    d = tmp_path / "d.safetensors"
    run_ok(["build", str(acts), "--out", str(d), "--k", "4", "-q"])
    rep = tmp_path / "rep.json"
    run_ok(["eval", str(d), str(acts), "--k", "3", "--batch-size", "700", "--out", str(rep)])
    report = itda.evaluate(Dictionary.load(d), str(acts), k=3, batch_size=700)
    assert json.loads(rep.read_text()) == report.summary()
    sae = tmp_path / "sae.safetensors"
    run_ok(_train_args(acts, sae))
    rep = tmp_path / "sae-rep.json"
    run_ok(["sae", "eval", str(sae), str(acts), "--out", str(rep)])
    assert json.loads(rep.read_text()) == itda.evaluate(load_sae(sae), str(acts)).summary()


@pytest.mark.slow
def test_model_commands_are_the_api(tmp_path, tiny):
    model, corpus, d = tiny
    cli = tmp_path / "cli.safetensors"
    source = ["--layer", "1", "--corpus", str(corpus), "--context", "32", "--init-sample", "256"]
    run_ok(_train_args(model, cli) + source)
    api = tmp_path / "api.safetensors"
    itda.train_sae(
        model=str(model), layer=1, corpus=str(corpus), context=32, init_sample=256, out=api, progress=False, **TRAIN
    )
    assert cli.read_bytes() == api.read_bytes()
    dictionary = Dictionary.load(d)
    out = tmp_path / "sub.jsonl"
    run_ok(["select", str(corpus), "--dict", str(d), "--budget", "3", "--context", "32", "--out", str(out), "-q"])
    sel = itda.select(str(corpus), dictionary, 3, context=32, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["doc"] for r in rows] == sel.chosen.tolist() and [r["text"] for r in rows] == list(sel.texts)
    assert [r["tokens"] for r in rows] == sel.tokens.tolist()
    r = run_ok(["explore", str(d), "--out", str(tmp_path / "x"), "--tokens", "300", "--context", "32", "-q"])
    page = itda.explore(dictionary, tmp_path / "y", tokens=300, context=32, progress=False, labels=["d"])
    assert page.index == tmp_path / "y" / "index.html" and page.shared is None
    assert (tmp_path / "x" / "data.json").read_bytes() == (tmp_path / "y" / "data.json").read_bytes()
    assert f"{page.views[0]['summary']['atoms']} atoms" in r.output
