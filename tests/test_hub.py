"""Models by Hugging Face hub ID through a hub cache laid out as huggingface_hub lays it out (blobs, symlinked
snapshots, refs), in a temporary HF_HOME; nothing here touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_bad, run_ok
from hub_cache import REV, place_in_hub_cache
from tiny_models import sample_docs, tiny_model, word_tokenizer

from itda.activations.hub import hub_cache, is_hub_id
from itda.activations.models import load_model, resolve_model_source
from itda.dictionary import Dictionary


@pytest.fixture
def hub_home(tmp_path: Path, monkeypatch) -> Path:
    """A temporary HF_HOME holding acme/tiny-llama: a sharded checkpoint (index + shards) and its tokenizer."""
    home = tmp_path / "hf"
    src = tmp_path / "src"
    model, tok = tiny_model("llama", vocab=len(word_tokenizer())), word_tokenizer()
    model.save_pretrained(src, max_shard_size="40KB")
    tok.save_pretrained(src)
    assert (src / "model.safetensors.index.json").exists()
    place_in_hub_cache(src, home / "hub", "acme/tiny-llama")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i, doc in enumerate(sample_docs(12)):
        (corpus / f"{i:02d}.txt").write_text(doc)
    return corpus


def test_hub_ids_are_recognised():
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("EleutherAI/pythia-160m")
    assert not is_hub_id("smollm2-135m") and not is_hub_id("a/b/c") and not is_hub_id("../x") and not is_hub_id("/x")


def test_hub_cache_follows_the_environment(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "h"))
    assert hub_cache() == tmp_path / "h" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache() == tmp_path / "c"


def test_a_cached_hub_model_loads_like_transformers_loads_it(hub_home: Path):
    from transformers import AutoModelForCausalLM

    source = resolve_model_source("acme/tiny-llama")
    assert source.name == REV and (source / "model.safetensors.index.json").is_symlink()
    lm = load_model("acme/tiny-llama", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained("acme/tiny-llama", cache_dir=str(hub_home / "hub")).eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 30]])
    with torch.no_grad():
        ours = lm.model(ids, output_hidden_states=True).hidden_states[2]
        theirs = ref(ids, output_hidden_states=True).hidden_states[2]
    assert lm.name == "acme/tiny-llama" and lm.device == torch.device("cpu") and lm.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert load_model("acme/tiny-llama", revision=REV, device="cpu").source == source


def test_build_from_a_sharded_hub_checkpoint_layerwise(hub_home: Path, tmp_path: Path):
    corpus = _corpus(tmp_path)
    common = ["--layer", "1", "--corpus", str(corpus), "--tokens", "400", "--context", "32", "--device", "cpu", "-q"]
    run_ok(["build", "acme/tiny-llama", *common, "--layerwise", "--out", str(tmp_path / "lw.safetensors")])
    run_ok(["build", "acme/tiny-llama", *common, "--in-memory", "--out", str(tmp_path / "mem.safetensors")])
    lw, mem = Dictionary.load(tmp_path / "lw.safetensors"), Dictionary.load(tmp_path / "mem.safetensors")
    assert lw.meta.model == "acme/tiny-llama" and lw.meta.build["model_revision"] == REV and len(lw) > 1
    assert torch.equal(lw.refs, mem.refs)
    torch.testing.assert_close(lw.atoms, mem.atoms, rtol=0, atol=1e-5)


def test_hub_models_that_are_not_there_are_refused_in_one_line(hub_home: Path, tmp_path: Path):
    out = str(tmp_path / "d.safetensors")
    run_bad(["build", "acme/missing", "--layer", "1", "--out", out], "model 'acme/missing' is not in the Hugging Face")
    run_bad(["build", "acme/missing", "--layer", "1", "--out", out], str(hub_home / "hub"))
    run_bad(["build", "acme/tiny-llama", "--revision", "v9", "--layer", "1", "--out", out], "at revision v9 is not in")
    run_bad(["build", "no-such-model", "--layer", "1", "--out", out], "nor a hub ID")
    assert not Path(out).exists()


def test_offline_flag_never_tries_the_network(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run_bad(
        ["build", "acme/tiny-llama", "--offline", "--layer", "1", "--out", str(tmp_path / "d.safetensors")],
        "offline",
    )


def test_importing_itda_changes_no_environment_variable():
    code = (
        "import os; before = dict(os.environ)\n"
        "import itda, itda.api, itda.activations.models, itda.activations.corpus, itda.cli.main\n"
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))\n"
        "assert not changed, changed\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
