"""`itda` commands: thin wrappers over the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from itda.activations.config import CorpusConfig, ModelSource
from itda.builder.builder import BuildConfig
from itda.cli.common import (
    OneLineErrors,
    check_checkpoint,
    check_device,
    check_output,
    checked_k,
    is_activation_file,
    on_interrupt,
    parse_memory,
    print_model_header,
    user_errors,
    write_report,
)
from itda.cli.explore import explore
from itda.cli.options import option
from itda.cli.outputs import Output, check_outputs, record_outputs
from itda.cli.sae import export, sae_app
from itda.cli.select import select
from itda.comparison.plan import CompareConfig
from itda.comparison.registry import DEFAULT_MEASURES, measures_help
from itda.configfields import field_help
from itda.errors import ItdaInputError

app = typer.Typer(
    cls=OneLineErrors, add_completion=False, no_args_is_help=True, help="Inference-Time Decomposition of Activations."
)
app.add_typer(sae_app, name="sae")
app.command("explore")(explore)
app.command("select")(select)
app.command()(export)


class Mode(str, Enum):
    improved = "improved"
    reference = "reference"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    numba = "numba"


class Method(str, Enum):
    mp = "mp"
    omp = "omp"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


def check_codes_fit(k: int, rows: int, device: str) -> None:
    """Refuse a --k whose sparse codes for one batch cannot fit in memory, before any work."""
    from itda.pursuit.api import codes_bytes
    from itda.resources import check_fits

    if k >= 1:
        check_fits(2 * codes_bytes(rows, k), f"--k {k} (sparse codes of a {rows}-row batch)", device)


@dataclass(frozen=True)
class BuildOutput:
    """Where and how `itda build` writes: the dictionary path, its storage dtype, the checkpoint."""

    out: Path
    dtype: DType = DType.float32
    overwrite: bool = False
    quiet: bool = False
    checkpoint: Path | None = None
    checkpoint_every: int = 10


@app.command()
@user_errors
def build(
    source: str = typer.Argument(
        ..., help="An activation file (.safetensors / .npy) or a model: packaged name, .gguf file or folder."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Dictionary file (activation file input; model input with one hookpoint) or folder (model input).",
    ),
    layer: list[int] = typer.Option(
        [], "--layer", "-l", help="Model input: block index; repeat for several (one pass)."
    ),
    hook: str = typer.Option("resid_post", help="Model input: resid_post, resid_pre, attn_out or mlp_out for --layer."),
    hookpoint: list[str] = typer.Option(
        [], help="Model input: extra hookpoints, e.g. blocks.3.hook_mlp_out or model.layers.3.mlp."
    ),
    corpus: str = option(CorpusConfig, "corpus"),
    field: str = option(CorpusConfig, "field"),
    split: str = option(CorpusConfig, "split"),
    dataset_config: str | None = option(CorpusConfig, "dataset_config"),
    tokens: int = option(CorpusConfig, "tokens"),
    context: int = option(CorpusConfig, "context"),
    batch_tokens: int = option(CorpusConfig, "batch_tokens"),
    stream_dtype: str = option(CorpusConfig, "stream_dtype"),
    model_dtype: str = option(ModelSource, "model_dtype"),
    include_special: bool = option(CorpusConfig, "include_special"),
    layerwise: bool | None = option(ModelSource, "layerwise", "--layerwise/--in-memory"),
    max_memory: str | None = option(ModelSource, "max_memory"),
    k: int = option(BuildConfig, "k"),
    threshold: float | None = option(BuildConfig, "threshold"),
    min_cosine: float | None = option(BuildConfig, "min_cosine"),
    mode: Mode = option(BuildConfig, "mode", choices=Mode),
    batch_size: int = typer.Option(4096, help="Activation file input: activations scored per step."),
    max_atoms: int | None = option(BuildConfig, "max_atoms"),
    checkpoint: Path | None = typer.Option(
        None,
        help="Checkpoint file (activation file or model input): saved every --checkpoint-every batches and on "
        "Ctrl-C, resumed when it exists, removed on success.",
    ),
    checkpoint_every: int = typer.Option(
        10,
        help="Batches between checkpoints (activation file: scoring steps; model: forward batches, "
        "per rank under torchrun).",
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an itda dictionary."),
    dtype: DType = typer.Option(DType.float32, help="Storage dtype of the atoms."),
    backend: Backend = option(BuildConfig, "backend", choices=Backend),
    device: str = option(ModelSource, "device"),
    revision: str | None = option(ModelSource, "revision"),
    offline: bool = option(ModelSource, "offline"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build dictionaries from an activation file, or from a model over a corpus."""
    if batch_size < 1:
        raise ItdaInputError(f"--batch-size must be >= 1, got {batch_size}")
    if checkpoint is not None and checkpoint_every < 1:
        raise ItdaInputError("--checkpoint-every must be >= 1 with --checkpoint")
    device = str(check_device(device))
    model = ModelSource(source, device, model_dtype, layerwise, parse_memory(max_memory), revision, offline)
    corpus_config = CorpusConfig(
        corpus, field, split, dataset_config, tokens, context, batch_tokens, include_special, stream_dtype
    )
    corpus_config.validate()
    if is_activation_file(source) and (layer or hookpoint):
        raise ItdaInputError(f"--layer and --hookpoint choose a model's hookpoints; {source} is an activation file")
    check_codes_fit(k, batch_size if is_activation_file(source) else batch_tokens, device)
    config = BuildConfig.choose(threshold, min_cosine, k=k, mode=mode.value, max_atoms=max_atoms, backend=backend.value)
    output = BuildOutput(out, dtype, overwrite, quiet, checkpoint, checkpoint_every)
    if is_activation_file(source):
        _build_from_file(Path(source), config, batch_size, device, output)
    else:
        hookpoints = _chosen_hookpoints(layer, hook, hookpoint)
        _build_from_model(model, corpus_config, config, hookpoints, output)


def _build_from_file(acts: Path, config: BuildConfig, batch_size: int, device: str, output: BuildOutput) -> None:
    import torch

    from itda.activations.files import load_activations
    from itda.builder import build_dictionary
    from itda.builder.distributed import init_distributed, rank_batches

    out, checkpoint = output.out, output.checkpoint
    check_checkpoint(checkpoint, [out], [])
    check_output(out, [acts] + ([checkpoint] if checkpoint else []), "dictionary", output.overwrite)
    exchange = init_distributed(check_device(device))
    data = load_activations(acts)
    if checkpoint is not None:
        on_interrupt(f"checkpoint saved at {checkpoint}; run the same command to resume")
    t0 = time.perf_counter()
    fingerprint = {"source": data.fingerprint(), "d": data.d, "batch_size": batch_size}
    batches = data.batches(batch_size)
    if exchange is not None:
        fingerprint["world_size"] = exchange.world
        empty = (data.acts[:0], data.refs[:0])
        batches = rank_batches(batches, exchange.rank, exchange.world, empty)
    dictionary = build_dictionary(
        batches,
        device=device,
        checkpoint=checkpoint,
        checkpoint_every=output.checkpoint_every if checkpoint else 0,
        progress=not output.quiet,
        total_tokens=len(data),
        fingerprint=fingerprint,
        exchange=exchange,
        k=config.k,
        threshold=config.threshold,
        min_cosine=config.min_cosine,
        mode=config.mode,
        max_atoms=config.max_atoms,
        backend=config.backend,
    )
    dictionary.meta.build["source"] = Path(data.source).name
    dictionary.meta.dataset_fingerprint = f"acts:{data.fingerprint()}"
    if exchange is not None:
        dictionary.meta.build["world_size"] = exchange.world
        exchange.barrier()
        if exchange.rank != 0:
            torch.distributed.destroy_process_group()
            return
    if output.dtype is DType.float16:
        dictionary = type(dictionary)(dictionary.atoms.half(), dictionary.refs, dictionary.meta)
    dictionary.save(out)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    if exchange is not None:
        torch.distributed.destroy_process_group()
    typer.echo(
        f"{out}: {len(dictionary)} atoms, d={dictionary.d}, from {len(data)} tokens in {time.perf_counter() - t0:.1f}s"
    )


def _chosen_hookpoints(layers: list[int], hook: str, extra: list[str]) -> list:
    """The hookpoints of --layer (of kind --hook) and --hookpoint, refused when there are none."""
    from itda.activations.hookpoints import parse_hookpoint

    if hook not in ("resid_post", "resid_pre", "attn_out", "mlp_out"):
        raise ItdaInputError(f"--hook must be resid_post, resid_pre, attn_out or mlp_out, got {hook!r}")
    hps = [parse_hookpoint(str(L), default_kind=hook) for L in layers] + [parse_hookpoint(h) for h in extra]
    if not hps:
        raise ItdaInputError("give at least one --layer or --hookpoint")
    return hps


def _model_build_files(
    hps: list, output: BuildOutput, model: ModelSource, corpus: CorpusConfig
) -> tuple[bool, list[Path]]:
    """(one file?, the dictionary paths) of a model build, refused when --out or --checkpoint do not fit."""
    out = output.out
    assert model.model is not None  # build() makes the ModelSource from its SOURCE argument
    one_file = len(hps) == 1 and out.suffix == ".safetensors" and not out.is_dir()
    if len(hps) > 1 and out.suffix == ".safetensors" and not out.is_dir():
        raise ItdaInputError(f"{out}: {len(hps)} hookpoints write one file each into a folder; give a folder for --out")
    if not one_file and out.exists() and not out.is_dir():
        raise ItdaInputError(
            f"{out}: exists and is not a folder (model builds write one file per hookpoint; "
            "one hookpoint and --out NAME.safetensors write that file)"
        )
    files = [out] if one_file else [out / f"{hp.file_stem}.safetensors" for hp in hps]
    check_outputs(
        [Output(p, "dictionary") for p in files], [model.model, corpus.corpus, output.checkpoint], output.overwrite
    )
    inputs = [Path(model.model)] + ([Path(corpus.corpus)] if corpus.corpus != "default" else [])
    check_checkpoint(output.checkpoint, files, inputs)
    return one_file, files


def _build_from_model(
    model: ModelSource, corpus: CorpusConfig, config: BuildConfig, hps: list, output: BuildOutput
) -> None:
    """Build one dictionary per hookpoint in one pass of the model over the corpus, and write them."""
    from itda.activations.hookpoints import depth, resolve_module
    from itda.activations.layerwise import LayerwiseModel
    from itda.builder.distributed import init_distributed
    from itda.builder.from_model import build_on_corpus
    from itda.devices import dtype_name

    model.validate()
    assert model.model is not None  # build() makes the ModelSource from its SOURCE argument
    one_file, _files = _model_build_files(hps, output, model, corpus)
    exchange = init_distributed(model.torch_device())
    deepest = max(hp.layer for hp in hps)
    lm = model.load(max_layer=deepest)
    if lm.layerwise is not None and not output.quiet:
        assert isinstance(lm.layerwise, LayerwiseModel)  # LoadedModel.layerwise: the LayerwiseModel or None
        typer.echo(f"layer-wise execution: blocks stream from {lm.source}, up to block {lm.layerwise.max_layer}")
    if lm.layerwise is not None and any(depth(lm.model, hp) > deepest for hp in hps):
        raise ItdaInputError("module-path hookpoints outside the blocks need --in-memory")
    for hp in hps:
        resolve_module(lm.model, hp)  # fail before the corpus work
    checkpoint = output.checkpoint
    if checkpoint is not None:
        on_interrupt(f"checkpoint saved at {checkpoint}; run the same command to resume")
    result = build_on_corpus(
        lm,
        hps,
        corpus,
        config,
        device=model.device,
        progress=not output.quiet,
        checkpoint=checkpoint,
        checkpoint_every=output.checkpoint_every,
        fingerprint={"model_dtype": dtype_name(lm.dtype)},
        exchange=exchange,
        on_start=(lambda: print_model_header(lm)) if exchange is None or exchange.rank == 0 else None,
    )
    _save_model_build(result, output.out, one_file, output.dtype, checkpoint, exchange)


def _save_model_build(result, out, one_file, dtype, checkpoint, exchange) -> None:
    """Rank 0 writes the dictionaries, then removes the checkpoint and reports; other ranks leave the group."""
    import torch

    from itda.builder.from_model import save_dictionaries
    from itda.dictionary import Dictionary

    if exchange is not None:
        exchange.barrier()
        if exchange.rank != 0:
            torch.distributed.destroy_process_group()
            return
    if dtype is DType.float16:
        result.dictionaries = {hp: Dictionary(d.atoms.half(), d.refs, d.meta) for hp, d in result.dictionaries.items()}
    if one_file:
        (dictionary,) = result.dictionaries.values()
        dictionary.save(out)
        paths = [out]
    else:
        paths = save_dictionaries(result, out)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    if exchange is not None:
        torch.distributed.destroy_process_group()
    typer.echo(
        f"{result.tokens} tokens in {result.seconds:.1f}s ({result.tokens_per_s:,.0f} tokens/s; "
        f"forward {result.forward_seconds:.1f}s)"
    )
    for p, (hp, d) in zip(paths, result.dictionaries.items(), strict=True):
        typer.echo(f"{p}: {len(d)} atoms at {hp.name}")


def _checksum_line(path: Path) -> str:
    from itda.tensorfile import read_header, recorded_digest

    if path.is_dir():
        return "none (a folder in another tool's format; its files carry no itda checksum)"
    recorded = recorded_digest(read_header(path))
    return f"ok (sha256 {recorded[:16]}...)" if recorded else "none recorded (written by an itda without checksums)"


def _sae_summary(path: Path, loaded, verify: bool) -> dict:
    sae, meta = loaded
    summary = {"file": str(path), "kind": "sae", **sae.cfg.to_dict(), **meta.__dict__}
    if verify:
        summary["checksum"] = _checksum_line(path)
    return summary


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        typer.echo(f"{key:20s} {value}")


@app.command()
@user_errors
def info(
    dictionary: Path = typer.Argument(..., help="Dictionary or SAE file (or a SAELens/sparsify folder)."),
    as_json: bool = typer.Option(False, "--json"),
    verify: bool = typer.Option(
        False, "--verify", help="Report the content checksum (every load checks it; this says so)."
    ),
) -> None:
    """Summarise a dictionary (its metadata, atoms and references) or an SAE, all validated."""
    from itda.dictionary import REF_FIELDS, Dictionary
    from itda.sae.io import load_sae_or_none

    sae = load_sae_or_none(dictionary)  # a checksum mismatch or invalid metadata stops here
    if sae is not None:
        _print_summary(_sae_summary(dictionary, sae, verify), as_json)
        return
    d = Dictionary.load(dictionary)
    summary = {
        "file": str(dictionary),
        "n_atoms": len(d),
        "dtype": str(d.atoms.dtype).replace("torch.", ""),
        **json.loads(d.meta.to_json()),
    }
    known = (d.refs[:, 0] >= 0).sum().item()
    summary["atoms_with_refs"] = int(known)
    if verify:
        summary["checksum"] = _checksum_line(dictionary)
    _print_summary(summary, as_json)
    if len(d) and not as_json:
        typer.echo(
            "first atoms: "
            + ", ".join(
                "(" + ", ".join(f"{f}={int(v)}" for f, v in zip(REF_FIELDS, row, strict=True)) + ")"
                for row in d.refs[:3].tolist()
            )
        )


@app.command()
@user_errors
def encode(
    dictionary: Path = typer.Argument(..., help="Dictionary file."),
    acts: Path = typer.Argument(..., help="Activation file."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Codes file to write (.safetensors: indices, values, residual_sq)."
    ),
    k: int | None = typer.Option(None, help="Atoms per activation (default: the dictionary's k)."),
    method: Method = typer.Option(Method.mp),
    backend: Backend = typer.Option(Backend.auto),
    batch_size: int = typer.Option(8192),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an itda codes file."),
) -> None:
    """Encode activations into sparse codes."""
    from itda.activations.files import load_activations
    from itda.dictionary import Dictionary
    from itda.pursuit.codes import cat_codes
    from itda.tensorfile import write_tensor_file

    outputs = [Output(out, "codes")]
    check_outputs(outputs, [dictionary, acts], overwrite)
    if batch_size < 1:
        raise ItdaInputError(f"--batch-size must be >= 1, got {batch_size}")
    d = Dictionary.load(dictionary)
    k = checked_k(k, d)
    data = load_activations(acts)
    if data.d != d.d:
        raise ItdaInputError(f"dimension mismatch: {acts} has d={data.d}, {dictionary} has d={d.d}")
    parts = [d.encode(x, k, method=method.value, backend=backend.value) for x, _ in data.batches(batch_size)]
    codes = cat_codes(parts)
    write_tensor_file(
        out,
        {f: getattr(codes, f) for f in codes._fields},
        "itda_codes",
        {"dictionary": str(dictionary), "method": method.value, "k": k},
    )
    record_outputs(outputs)
    typer.echo(f"{out}: codes for {len(data)} tokens, k={codes.indices.shape[1]}")


@app.command("eval")
@user_errors
def eval_cmd(
    dictionary: Path = typer.Argument(..., help="Dictionary file."),
    acts: Path | None = typer.Argument(None, help="Activation file to evaluate on (or use --model)."),
    model: str | None = typer.Option(None, help="Evaluate on a model's activations (default: the dictionary's model)."),
    corpus: str = option(CorpusConfig, "corpus", help="With a model: corpus (its held-out split is used)."),
    field: str = option(CorpusConfig, "field"),
    tokens: int = typer.Option(16_384, help="With a model: held-out tokens."),
    context: int = option(CorpusConfig, "context"),
    ce: bool = typer.Option(True, help="With a causal LM: compute the CE-loss score."),
    k: int | None = typer.Option(None, help="Atoms per activation (default: the dictionary's k)."),
    method: Method = typer.Option(Method.mp),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
    batch_size: int = typer.Option(8192),
    device: str = option(ModelSource, "device"),
    layerwise: bool | None = option(ModelSource, "layerwise", "--layerwise/--in-memory"),
    max_memory: str | None = option(ModelSource, "max_memory"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that itda did not write."),
) -> None:
    """FVU, cosine, normalised loss, L0, atom usage (and the CE-loss score on a model)."""
    from itda.api import evaluate
    from itda.dictionary import Dictionary

    if batch_size < 1:
        raise ItdaInputError(f"--batch-size must be >= 1, got {batch_size}")
    outputs = [Output(out, "eval-report")] if out is not None else []
    check_outputs(outputs, [dictionary, acts, model, None if corpus == "default" else corpus], overwrite)
    device = str(check_device(device))
    d = Dictionary.load(dictionary, device=device)
    k = checked_k(k, d)
    if acts is not None:
        from itda.activations.files import load_activations

        data = load_activations(acts)
        if data.d != d.d:
            raise ItdaInputError(f"dimension mismatch: {acts} has d={data.d}, {dictionary} has d={d.d}")
        report = evaluate(d, data, k=k, method=method.value, batch_size=batch_size)
    else:
        model = model or d.meta.model
        if not model:
            raise ItdaInputError(f"{dictionary}: no model recorded; give an activation file or --model")
        on_model: dict[str, Any] = dict(
            corpus=corpus, field=field, tokens=tokens, context=context, ce=ce, device=device
        )
        memory: dict[str, Any] = dict(layerwise=layerwise, max_memory=parse_memory(max_memory))
        report = evaluate(d, model=model, k=k, method=method.value, **on_model, **memory)
    write_report(report.summary(), out, outputs)


@app.command()
@user_errors
def compare(
    a: str = typer.Argument(..., help="Model, dictionary file/folder, or activation file."),
    b: str = typer.Argument(..., help="Same kind as A (a model may be A itself)."),
    corpus: str = option(CorpusConfig, "corpus", help="Models: corpus both read (held-out split of the default)."),
    field: str = option(CorpusConfig, "field"),
    split: str = option(CorpusConfig, "split"),
    dataset_config: str | None = option(CorpusConfig, "dataset_config"),
    tokens: int = option(CompareConfig, "tokens"),
    context: int = option(CompareConfig, "context"),
    batch_tokens: int = option(CompareConfig, "batch_tokens"),
    measures: str = typer.Option(",".join(DEFAULT_MEASURES), help=measures_help()),
    out: Path | None = typer.Option(None, "--out", "-o", help="Folder for JSON, CSV and PNG heatmaps."),
    k: int = option(CompareConfig, "k"),
    min_cosine: float = option(CompareConfig, "min_cosine"),
    max_rows: int = option(CompareConfig, "max_rows"),
    precision: str = option(CompareConfig, "precision"),
    include_special: bool = option(CompareConfig, "include_special"),
    stream_dtype: str = option(CompareConfig, "stream_dtype"),
    cka_memory: str = typer.Option("1GiB", help=field_help(CompareConfig, "cka_memory").replace(" in bytes", "")),
    cka_minibatch: int = option(CompareConfig, "cka_minibatch"),
    device: str = option(ModelSource, "device"),
    model_dtype: str = option(ModelSource, "model_dtype"),
    offline: bool = option(ModelSource, "offline"),
    layerwise: bool | None = option(ModelSource, "layerwise", "--layerwise/--in-memory"),
    max_memory: str | None = option(ModelSource, "max_memory"),
    overwrite: bool = typer.Option(False, help="Write into an existing --out folder that itda did not write."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Compare models layer by layer, two dictionaries (or folders of them), or two activation files."""
    from itda.cli.compare import compare_command, measure_list
    from itda.comparison.registry import expand_measures

    device = str(check_device(device))
    names = measure_list(measures)
    config = CompareConfig(
        tokens=tokens,
        measures=tuple(expand_measures(names)),
        context=context,
        batch_tokens=batch_tokens,
        k=k,
        min_cosine=min_cosine,
        max_rows=max_rows,
        precision=precision,
        include_special=include_special,
        stream_dtype=stream_dtype,
        cka_memory=parse_memory(cka_memory, "--cka-memory"),
        cka_minibatch=cka_minibatch,
    )
    models = ModelSource(None, device, model_dtype, layerwise, parse_memory(max_memory), offline=offline)
    models.validate()
    text = CorpusConfig(corpus, field, split, dataset_config)
    compare_command(
        a, b, names, config, models, corpus=text.source, field=field, out=out, quiet=quiet, overwrite=overwrite
    )


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Folder for the dictionary and report."),
    tokens: int = typer.Option(100_000, help="Tokens to build from."),
    eval_tokens: int = typer.Option(8192, help="Held-out tokens to evaluate on."),
    model: str = typer.Option("smollm2-135m", help="Model to decompose."),
    layer: int | None = typer.Option(None, help="Block index (default: the middle one)."),
    overwrite: bool = typer.Option(False, help="Replace a report or explorer in --out that itda did not write."),
) -> None:
    """smollm2-135m on the default corpus: build at a middle layer, evaluate held-out, report."""
    from itda.cli.demo import print_demo
    from itda.demo import run_demo

    outputs = [Output(out / "report.json", "demo-report"), Output(out / "explorer", "explorer", folder=True)]
    check_outputs(outputs, [model], overwrite)
    result = run_demo(out, tokens, eval_tokens, model, layer)
    record_outputs(outputs)
    print_demo(result)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
