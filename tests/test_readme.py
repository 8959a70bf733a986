"""Every Python example of the README's "Python API" section runs, on tiny models (so the documented API cannot rot)."""

import os
import re
from pathlib import Path

import pytest
from cli_helpers import synthetic_acts_file

README = Path(__file__).parents[1] / "README.md"


def api_examples() -> str:
    """The section's ```python blocks, in order, as one script."""
    text = README.read_text()
    section = text[text.index("## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def small(script: str, values: dict[str, str]) -> str:
    """The script with the README's sizes and names replaced; every replacement must find its text."""
    for old, new in values.items():
        assert old in script, f"the README no longer contains {old!r}: update this test's substitutions"
        script = script.replace(old, new)
    return script


@pytest.mark.slow
def test_python_api_examples_run(tmp_path, monkeypatch):
    from tiny_models import saved_model_and_corpus, tiny_model, word_tokenizer

    model_a, corpus, _docs = saved_model_and_corpus(tmp_path, 40, seed=4)
    model_b = tmp_path / "tiny_b"
    tiny_model("gpt2", vocab=len(word_tokenizer()), seed=1).save_pretrained(model_b)
    word_tokenizer().save_pretrained(model_b)
    synthetic_acts_file(tmp_path / "acts.safetensors", 3000, 32, n_features=64, seed=0)  # the tiny models' width
    script = small(
        api_examples(),
        {
            '"smollm2-135m"': repr(str(model_a)),
            '"gemma3-270m"': repr(str(model_b)),
            '"default"': repr(str(corpus)),
            "layers=[8, 15]": "layers=[1, 3]",
            "resid_post.15": "resid_post.3",
            "tokens=100_000": "tokens=1_500",
            "tokens=8_192": "tokens=600",
            "tokens=20_000": "tokens=800",
            "latents=4_608": "latents=256",
            "steps=1_000": "steps=10",
            "batch_size=1_024": "batch_size=64",
            "budget=50": "budget=3",
        },
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(README), "exec"), {})  # noqa: S102 - our own README
    assert (tmp_path / "resid_post.3.safetensors").is_file() and (tmp_path / "cmp" / "summary.json").is_file()
    assert (tmp_path / "sae_saelens" / "cfg.json").is_file() and (tmp_path / "explorer" / "index.html").is_file()
    assert os.path.exists(tmp_path / "cmp" / "itda_fused.json")


def section_examples(title: str) -> str:
    """The ```python blocks of the README section `title` (up to the next '## '), in order, as one script."""
    text = README.read_text()
    section = text[text.index(f"## {title}\n") :]
    section = section[: section.index("\n## ", 1)]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


@pytest.mark.slow
def test_use_your_own_model_examples_run(tmp_path, monkeypatch):
    """The hub-ID example through a hub cache in a temporary HF_HOME, the dataset ID through a local dataset
    repository read by the same streaming path, the layer-wise example on a sharded folder."""
    from hub_cache import place_in_hub_cache
    from test_hub_datasets import parquet_repo
    from tiny_models import saved_model_and_corpus

    model, _corpus, docs = saved_model_and_corpus(tmp_path, 40, seed=4)
    place_in_hub_cache(model, tmp_path / "hf" / "hub", "meta-llama/Llama-3.1-8B")
    repo = parquet_repo(tmp_path / "pile", {"train": docs})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = small(
        section_examples("Use your own model"),
        {
            '"NeelNanda/pile-10k"': repr(str(repo)),
            "layers=[16]": "layers=[1]",
            "resid_post.16": "resid_post.1",
            "tokens=100_000": "tokens=500",
            '"/models/Llama-3.1-70B"': repr(str(model)),
            "max_layer=40": "max_layer=2",
            'device="cuda"': 'device="cpu"',
        },
    )
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(README), "exec"), {})  # noqa: S102 - our own README
    from itda import Dictionary

    d = Dictionary.load(tmp_path / "d" / "resid_post.1.safetensors")
    assert d.meta.model == "meta-llama/Llama-3.1-8B" and d.meta.build["corpus"] == str(repo)
