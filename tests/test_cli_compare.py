import json

import numpy as np
import pytest
from tiny_models import sample_docs, tiny_model, word_tokenizer
from typer.testing import CliRunner

from itda.activations.files import save_activations
from itda.cli.main import app
from itda.synthetic import synthetic_activations

runner = CliRunner()


@pytest.fixture()
def model_dir(tmp_path):
    tok = word_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(30, seed=4)))
    return p


def test_compare_model_with_itself(tmp_path, model_dir, corpus):
    out = tmp_path / "cmp"
    r = runner.invoke(
        app,
        [
            "compare",
            str(model_dir),
            str(model_dir),
            "--corpus",
            str(corpus),
            "--tokens",
            "1500",
            "--context",
            "32",
            "--measures",
            "jaccard,cka,svcca",
            "--k",
            "8",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "argmax accuracy 1.00" in r.output and "BOS/special tokens dropped" in r.output
    for name in ("cka", "cka_debiased", "svcca", "jaccard_raw", "jaccard_crop", "jaccard_chance"):
        m = np.array(json.loads((out / f"{name}.json").read_text())["matrix"])
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
        assert (out / f"{name}.png").exists() and (out / f"{name}.csv").exists()
    assert json.loads((out / "summary.json").read_text())["model_level"]["jaccard_model"] == pytest.approx(1.0)


def test_compare_dictionaries_and_folders(tmp_path, model_dir, corpus):
    out = tmp_path / "d"
    r = runner.invoke(
        app,
        [
            "build",
            str(model_dir),
            "--layer",
            "1",
            "--layer",
            "2",
            "--corpus",
            str(corpus),
            "--tokens",
            "800",
            "--context",
            "32",
            "--k",
            "8",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["compare", str(out / "resid_post.1.safetensors"), str(out / "resid_post.1.safetensors")])
    assert r.exit_code == 0 and "jaccard_raw      1.0000" in r.output, r.output
    r = runner.invoke(app, ["compare", str(out), str(out), "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "f" / "jaccard_raw.json").read_text())["matrix"]
    assert m[0][0] == 1.0 and m[1][1] == 1.0 and m[0][1] < 1.0


def test_model_build_with_one_hookpoint_writes_the_named_file(tmp_path, model_dir, corpus):
    from itda.dictionary import Dictionary

    base = ["build", str(model_dir), "--corpus", str(corpus), "--tokens", "500", "--context", "32", "--k", "8", "-q"]
    out = tmp_path / "one.safetensors"
    r = runner.invoke(app, base + ["--layer", "1", "--out", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    assert Dictionary.load(out).meta.hookpoint == "resid_post.1"
    r = runner.invoke(app, base + ["--layer", "1", "--layer", "2", "--out", str(tmp_path / "two.safetensors")])
    assert r.exit_code == 2 and "give a folder" in r.output and not (tmp_path / "two.safetensors").exists()
    foreign = tmp_path / "notes.safetensors"
    foreign.write_bytes(b"not mine")
    r = runner.invoke(app, base + ["--layer", "1", "--out", str(foreign)])
    assert r.exit_code == 2 and foreign.read_bytes() == b"not mine"


def test_compare_activation_files(tmp_path):
    data = synthetic_activations(600, 16, n_features=64, seed=1)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.npy"
    save_activations(a, data.acts)
    np.save(b, (data.acts.numpy() * 2.0).astype(np.float32))
    r = runner.invoke(app, ["compare", str(a), str(b), "--measures", "cka,svcca,relative"])
    assert r.exit_code == 0, r.output
    assert "cka              1.0000" in r.output and "svcca            1.0000" in r.output


def test_compare_bad_input(tmp_path, model_dir):
    data = synthetic_activations(50, 16, seed=1)
    a = tmp_path / "a.safetensors"
    save_activations(a, data.acts)
    r = runner.invoke(app, ["compare", str(a), str(model_dir)])
    assert r.exit_code == 2 and "two of a kind" in r.output
    r = runner.invoke(app, ["compare", str(a), str(a), "--measures", "cka,magic"])
    assert r.exit_code == 2 and "unknown measures: magic" in r.output
