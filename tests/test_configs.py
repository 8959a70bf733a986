"""The configuration dataclasses are the one source of the CLI's build and train options."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from itda.activations.config import CorpusConfig, ModelSource
from itda.builder import BuildConfig
from itda.cli.explore import explore
from itda.cli.main import build, compare, eval_cmd
from itda.cli.sae import eval_cmd as sae_eval
from itda.cli.sae import train
from itda.cli.select import select
from itda.comparison.plan import CompareConfig
from itda.configfields import FieldError
from itda.sae.train import SaeSpec, TrainConfig

CONFIGS = (ModelSource, CorpusConfig, BuildConfig, TrainConfig, SaeSpec, CompareConfig)

# Per command: its config classes, the fields it offers no option for (why), its options that are no config's
# choice (outputs, hookpoints, checkpoints: how one run writes), and its argument that holds ModelSource.model.
COMMANDS = {
    "build": (
        build,
        (ModelSource, CorpusConfig, BuildConfig),
        {"model": "the SOURCE argument", "round_size": "library only", "early_stop": "library only"},
        {
            "source",
            "out",
            "layer",
            "hook",
            "hookpoint",
            "batch_size",
            "checkpoint",
            "checkpoint_every",
            "overwrite",
            "dtype",
            "quiet",
        },
    ),
    "sae train": (
        train,
        (ModelSource, CorpusConfig, TrainConfig, SaeSpec),
        {
            "model": "the SOURCE argument",
            "tokens": "steps x batch size",
            "include_special": "not offered",
            "stream_dtype": "dense float32",
            "k_aux": "library only",
            "resample_min_cosine": "library only",
        },
        {
            "source",
            "out",
            "checkpoint",
            "checkpoint_every",
            "layer",
            "hookpoint",
            "layers",
            "distribute_hookpoints",
            "overwrite",
            "quiet",
        },
    ),
    "compare": (
        compare,
        (ModelSource, CorpusConfig, CompareConfig),
        {
            "model": "the A and B arguments",
            "revision": "two models: not offered",
            "stream_dtype": "CompareConfig.stream_dtype (the chunks' unit rows) is the one offered",
            "measures": "--measures, a comma list",
            "cka_memory": "--cka-memory, a size such as 1GiB",
        },
        {"a", "b", "measures", "out", "cka_memory", "overwrite", "quiet"},
    ),
}
# eval, explore and select share some options with the configs: those named like a field map to it
SHARED = {
    "eval": (eval_cmd, {"tokens": "held-out tokens, 16384", "k": "default: the dictionary's k"}),
    "sae eval": (sae_eval, {"tokens": "held-out tokens, 16384"}),
    "explore": (
        explore,
        {"tokens": "held-out tokens", "corpus": "default: the recorded one", "k": "default: the dictionary's k"},
    ),
    "select": (select, {"k": "default: the dictionary's k", "seed": "the random baseline's", "corpus": "an argument"}),
}


def _options(command) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(command).parameters)


def _field(param: inspect.Parameter):
    return getattr(param.default, "itda_field", None)


def _same_default(option_default, field_default) -> bool:
    if field_default is dataclasses.MISSING:
        return option_default is ...
    return option_default == field_default or (option_default is None and field_default is None)


def test_every_field_has_a_one_line_help():
    for config in CONFIGS:
        for f in dataclasses.fields(config):
            text = f.metadata.get("help", "")
            assert text and "\n" not in text, f"{config.__name__}.{f.name} has no one-line help"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_and_fields_map_one_to_one(name):
    command, configs, not_offered, run_options = COMMANDS[name]
    params = _options(command)
    mapped = {}
    for pname, param in params.items():
        where = _field(param)
        if where is None:
            assert pname in run_options, f"{name} --{pname} is neither a config field nor a run option"
            continue
        config, fname = where
        assert fname == pname, f"{name} --{pname} maps to {config.__name__}.{fname}"
        default = {f.name: f for f in dataclasses.fields(config)}[fname].default
        assert _same_default(param.default.default, default), (
            f"{name} --{pname}: {param.default.default!r} != {default!r}"
        )
        mapped[fname] = config
    for config in configs:
        for f in dataclasses.fields(config):
            assert f.name in mapped or f.name in not_offered, f"{name} has no option for {config.__name__}.{f.name}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_options_map_to_their_field(name):
    command, different = SHARED[name]
    fields = {f.name: (c, f) for c in (ModelSource, CorpusConfig, BuildConfig) for f in dataclasses.fields(c)}
    for pname, param in _options(command).items():
        if pname not in fields or pname in different or pname == "model":
            continue
        assert _field(param) == (fields[pname][0], pname), (
            f"{name} --{pname} should be option({fields[pname][0].__name__}, {pname!r})"
        )


def test_validation_names_the_field_and_the_cli_its_flag(tmp_path: Path):
    from typer.testing import CliRunner

    from itda.cli.main import app

    with pytest.raises(FieldError, match="^steps must be >= 1") as err:
        TrainConfig(steps=0).validate()
    assert err.value.field == "steps" and "--" not in str(err.value)
    with pytest.raises(FieldError, match="batch_tokens"):
        CorpusConfig(batch_tokens=0).validate()
    with pytest.raises(FieldError, match="model_dtype"):
        ModelSource(model_dtype="int8").validate()
    with pytest.raises(FieldError, match="holdout"):
        SaeSpec(latents=8, k=4, holdout=1.0).validate()
    r = CliRunner().invoke(
        app, ["build", "smollm2-135m", "--layer", "1", "--out", str(tmp_path / "o"), "--tokens", "0"]
    )
    assert r.exit_code == 2 and "--tokens must be >= 1" in r.output


def test_defaults_live_in_the_configs():
    assert BuildConfig.choose() == BuildConfig(k=40, min_cosine=0.85)
    assert BuildConfig.choose(threshold=0.01).min_cosine is None
    with pytest.raises(FieldError, match="not both"):
        BuildConfig.choose(threshold=0.01, min_cosine=0.9)
    assert TrainConfig().resample_min_cosine == BuildConfig.DEFAULT_MIN_COSINE
