"""Corpora by dataset name: local dataset repositories (Parquet, JSONL) read through the same `datasets`
streaming path as hub dataset IDs, only as far as the tokens need; nothing here touches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_bad, run_ok
from tiny_models import sample_docs, saved_model_and_corpus

from itda.activations.corpus import load_contexts, read_documents
from itda.activations.hub_datasets import DatasetSpec, StreamedDocuments, dataset_spec, parse_dataset_spec
from itda.dictionary import Dictionary

pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")


def parquet_repo(root: Path, splits: dict[str, list[str]]) -> Path:
    """A dataset repository folder as the hub holds one: data/<split>-00000-of-00001.parquet, columns text, n."""
    import pyarrow as pa

    (root / "data").mkdir(parents=True)
    for split, docs in splits.items():
        table = pa.table({"text": docs, "n": list(range(len(docs)))})
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def jsonl_repo(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    return root


def test_specs_round_trip(tmp_path: Path):
    repo = parquet_repo(tmp_path / "r", {"train": ["a b c"]})
    assert parse_dataset_spec(str(repo)) == DatasetSpec(str(repo))
    assert parse_dataset_spec("NeelNanda/pile-10k") == DatasetSpec("NeelNanda/pile-10k")
    assert parse_dataset_spec("org/name:validation") == DatasetSpec("org/name", None, "validation")
    assert parse_dataset_spec("org/name:en:test") == DatasetSpec("org/name", "en", "test")
    assert dataset_spec("org/name", "test", "en") == "org/name:en:test" and dataset_spec("org/name") == "org/name"
    assert parse_dataset_spec("default") is None and parse_dataset_spec(str(tmp_path / "x.jsonl")) is None
    txt = tmp_path / "t"
    txt.mkdir()
    (txt / "a.txt").write_text("x")
    assert parse_dataset_spec(str(txt)) is None  # a folder of .txt documents stays one


def test_streaming_reads_only_what_the_tokens_need(tmp_path: Path):
    from tiny_models import word_tokenizer

    docs = sample_docs(2000, seed=1)
    repo = parquet_repo(tmp_path / "r", {"train": docs})
    streamed = read_documents(str(repo))
    assert isinstance(streamed, StreamedDocuments)
    read, contexts = load_contexts(str(repo), word_tokenizer(), tokenizer_name="w", tokens=300, context=32)
    assert 0 < len(read) < 40 and read == docs[: len(read)]
    assert int(contexts.attention_mask.sum()) >= 300
    assert len(streamed) == 2000 and list(streamed[:3]) == docs[:3]


def test_a_dataset_corpus_builds_what_the_same_documents_in_a_file_build(tmp_path: Path):
    model, corpus_file, docs = saved_model_and_corpus(tmp_path, 30, seed=3)
    repo = parquet_repo(tmp_path / "repo", {"train": docs, "validation": sample_docs(10, seed=9)})
    common = ["--layer", "1", "--tokens", "600", "--context", "32", "--device", "cpu", "-q"]
    run_ok(["build", str(model), "--corpus", str(corpus_file), *common, "--out", str(tmp_path / "file.safetensors")])
    run_ok(["build", str(model), "--corpus", str(repo), *common, "--out", str(tmp_path / "ds.safetensors")])
    a, b = Dictionary.load(tmp_path / "file.safetensors"), Dictionary.load(tmp_path / "ds.safetensors")
    assert b.meta.build["corpus"] == str(repo) and b.meta.dataset_fingerprint == a.meta.dataset_fingerprint
    assert a.refs.tolist() == b.refs.tolist() and a.atoms.equal(b.atoms)
    run_ok(
        ["build", str(model), "--corpus", str(repo), "--split", "validation", *common, "--tokens", "200"]
        + ["--out", str(tmp_path / "val.safetensors")]
    )
    val = Dictionary.load(tmp_path / "val.safetensors")
    assert val.meta.build["corpus"] == f"{repo}:validation"
    held = sample_docs(10, seed=9)
    for doc, _pos, start, end, _tok in val.refs.tolist():  # every atom points into the validation documents
        assert 0 <= doc < len(held) and 0 <= start < end <= len(held[doc])


def test_jsonl_repository_with_field_and_a_missing_field(tmp_path: Path):
    model, _corpus, docs = saved_model_and_corpus(tmp_path, 20, seed=4)
    repo = jsonl_repo(tmp_path / "j", docs)
    out = tmp_path / "d.safetensors"
    common = ["build", str(model), "--corpus", str(repo), "--layer", "1", "--tokens", "300", "--device", "cpu"]
    run_bad([*common, "--out", str(out)], "no field 'text' (fields: body)")
    assert not out.exists()
    run_ok([*common, "--field", "body", "--out", str(out), "-q"])
    assert len(Dictionary.load(out)) > 1


def test_unknown_hub_dataset_offline_is_one_line(tmp_path: Path):
    model, _corpus, _docs = saved_model_and_corpus(tmp_path, 4, seed=0)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "d.safetensors"
    args = ["build", str(model), "--corpus", "acme/no-such-dataset", "--layer", "1", "--out", str(out)]
    r = subprocess.run([sys.executable, "-m", "itda", *args], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: dataset acme/no-such-dataset: cannot be opened"), lines
    assert not out.exists()


def test_compare_streams_a_dataset_only_as_far_as_its_tokens(tmp_path: Path, monkeypatch):
    import itda.activations.corpus as corpus_module

    model, _corpus, _docs = saved_model_and_corpus(tmp_path, 4, seed=0)
    repo = parquet_repo(tmp_path / "big", {"train": sample_docs(3000, seed=2)})
    opened: list[StreamedDocuments] = []
    real = corpus_module.read_documents

    def spy(source, field="text"):
        docs = real(source, field)
        opened.append(docs)
        return docs

    monkeypatch.setattr(corpus_module, "read_documents", spy)
    args = ["compare", str(model), str(model), "--corpus", str(repo), "--measures", "cka", "--tokens", "300"]
    result = run_ok([*args, "--device", "cpu", "-q"])
    assert "cka" in result.output and len(opened) == 1 and isinstance(opened[0], StreamedDocuments)
    assert 0 < len(opened[0].read) < 60  # of 3,000 documents
