"""The model-facing CLI: build several layers in one pass, eval with the CE-loss score, bad input."""

import json

import pytest
from cli_helpers import run_bad as _bad
from cli_helpers import run_ok as _ok
from tiny_models import sample_docs

from itda.dictionary import Dictionary

pytestmark = pytest.mark.slow


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(60, seed=3)))
    return p


def test_build_two_layers_then_eval(tmp_path):
    out = tmp_path / "dicts"
    _ok(
        [
            "build",
            "smollm2-135m",
            "--layer",
            "3",
            "--layer",
            "5",
            "--corpus",
            "default",
            "--tokens",
            "1500",
            "--k",
            "16",
            "--out",
            str(out),
            "-q",
        ]
    )
    d3, d5 = Dictionary.load(out / "resid_post.3.safetensors"), Dictionary.load(out / "resid_post.5.safetensors")
    assert d3.meta.dataset_fingerprint == d5.meta.dataset_fingerprint and d3.meta.layer == 3 and d5.meta.layer == 5
    assert d3.meta.model == "smollm2-135m" and d3.meta.build["tokens"] >= 1500
    rep = tmp_path / "eval.json"
    _ok(["eval", str(out / "resid_post.3.safetensors"), "--tokens", "600", "--out", str(rep)])
    summary = json.loads(rep.read_text())
    assert summary["ce_clean"] < summary["ce_spliced"] < summary["ce_zero"]
    assert 0 < summary["ce_loss_score"] < 1 and 0 < summary["fvu"] < 1


def test_model_bad_inputs(tmp_path, corpus):
    out = tmp_path / "o"
    _bad(["build", "no-such-model", "--layer", "3", "--out", str(out)], "neither a packaged model")
    _bad(
        ["build", "smollm2-135m", "--layer", "30", "--corpus", str(corpus), "--out", str(out)], "layer 30 out of range"
    )
    _bad(
        ["build", "smollm2-135m", "--layer", "3", "--corpus", str(tmp_path / "nope.jsonl"), "--out", str(out)],
        "no such corpus",
    )
    _bad(["build", "smollm2-135m", "--out", str(out)], "at least one --layer")
    assert not out.exists()


def test_eval_refuses_wrong_tokenizer(tmp_path, corpus):
    out = tmp_path / "d"
    _ok(
        [
            "build",
            "minilm-l6",
            "--layer",
            "2",
            "--corpus",
            str(corpus),
            "--tokens",
            "500",
            "--k",
            "8",
            "--out",
            str(out),
            "-q",
        ]
    )
    _bad(
        ["eval", str(out / "resid_post.2.safetensors"), "--model", "smollm2-135m", "--corpus", str(corpus)],
        "tokenizer mismatch",
    )
