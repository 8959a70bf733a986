"""`itda sae train|eval` and `itda export`: parse, call itda.api (train_sae, evaluate, export), print."""

from __future__ import annotations

import dataclasses
import time
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from itda.activations.config import CorpusConfig, ModelSource
from itda.cli.common import (
    check_checkpoint,
    check_device,
    check_output,
    is_activation_file,
    on_interrupt,
    parse_memory,
    print_model_header,
    print_summary,
    user_errors,
    write_report,
)
from itda.cli.options import option
from itda.errors import ItdaInputError
from itda.sae.train import SaeSpec, TrainConfig

sae_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Sparse autoencoders seeded from ITDA dictionaries."
)


class ExportFormat(str, Enum):
    saelens = "saelens"
    sparsify = "sparsify"
    saelens_mp = "saelens-mp"


@sae_app.command("train")
@user_errors
def train(
    source: str = typer.Argument(..., help="An activation file (.safetensors / .npy) or a model (with --layer)."),
    out: Path = typer.Option(..., "--out", "-o", help="SAE file to write (.safetensors)."),
    latents: int = option(SaeSpec, "latents", "--latents"),
    k: int = option(SaeSpec, "k"),
    arch: str = option(SaeSpec, "arch"),
    matryoshka_widths: str | None = option(SaeSpec, "matryoshka_widths"),
    init: str = option(SaeSpec, "init"),
    steps: int = option(TrainConfig, "steps"),
    batch_size: int = option(SaeSpec, "batch_size"),
    lr: float | None = option(TrainConfig, "lr"),
    lr_warmup_steps: int = option(TrainConfig, "lr_warmup_steps"),
    lr_decay: float = option(TrainConfig, "lr_decay"),
    b_dec: str = option(SaeSpec, "b_dec"),
    fill: str | None = option(SaeSpec, "fill"),
    crop: bool = option(SaeSpec, "crop"),
    centre_atoms: bool = option(SaeSpec, "centre_atoms"),
    batch_topk: bool = option(SaeSpec, "batch_topk"),
    auxk_alpha: float = option(TrainConfig, "auxk_alpha"),
    dead_after_tokens: int = option(TrainConfig, "dead_after_tokens"),
    resample: str | None = option(TrainConfig, "resample"),
    resample_every: int = option(TrainConfig, "resample_every"),
    seed: int = option(TrainConfig, "seed"),
    threshold_lr: float = option(TrainConfig, "threshold_lr"),
    init_sample: int = option(SaeSpec, "init_sample"),
    holdout: float = option(SaeSpec, "holdout"),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint file; an existing one is resumed."),
    checkpoint_every: int = typer.Option(100, help="Steps between checkpoints."),
    layer: int | None = typer.Option(
        None, "--layer", "-l", help="Block index (resid_post): the model's to train on, or an activation file's."
    ),
    hookpoint: str | None = typer.Option(
        None, help="Hookpoint name instead of --layer (an activation file's is recorded, so exports name it)."
    ),
    layers: str | None = typer.Option(
        None,
        help="Model input: several block indices or hookpoint names (4,8,resid_post.12), one SAE each from one "
        "forward pass; --out is then a folder (OUT/<hookpoint>.safetensors) and --checkpoint too.",
    ),
    distribute_hookpoints: bool = typer.Option(
        False, help="With --layers under torchrun: each rank trains some hookpoints on the whole batch."
    ),
    corpus: str = option(CorpusConfig, "corpus", help="Model input: corpus (its training split)."),
    field: str = option(CorpusConfig, "field"),
    split: str = option(CorpusConfig, "split"),
    dataset_config: str | None = option(CorpusConfig, "dataset_config"),
    context: int = option(CorpusConfig, "context"),
    batch_tokens: int = option(CorpusConfig, "batch_tokens"),
    layerwise: bool | None = option(ModelSource, "layerwise", "--layerwise/--in-memory"),
    max_memory: str | None = option(ModelSource, "max_memory"),
    device: str = option(ModelSource, "device"),
    model_dtype: str = option(ModelSource, "model_dtype"),
    revision: str | None = option(ModelSource, "revision"),
    offline: bool = option(ModelSource, "offline"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an itda SAE."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train an SAE (--arch topk, batchtopk or matryoshka_batchtopk) on an activation file or a model's
    activations, from any initialisation."""
    from itda.api import train_sae
    from itda.builder.distributed import rank_from_env

    params = dict(locals())  # the options by name, before anything else is bound
    root = rank_from_env() == 0  # under torchrun rank 0 speaks for every rank
    params["quiet"] = quiet or not root
    if layers is not None:
        _train_hookpoints(params, root)
        return
    if distribute_hookpoints:
        raise ItdaInputError("--distribute-hookpoints needs --layers")
    started: list[float] = []
    loaded = train_sae(**_train_arguments(params, root, started))
    if root:
        _print_trained(loaded, params, time.perf_counter() - started[0])


def _train_hookpoints(params: dict[str, Any], root: bool) -> None:
    """`--layers`: one SAE per hookpoint into the --out folder, from one forward pass per batch."""
    from itda.api import train_saes
    from itda.sae.multi import parse_hookpoints

    source, out, checkpoint = params["source"], Path(params["out"]), params["checkpoint"]
    if is_activation_file(source) or params["layer"] is not None or params["hookpoint"] is not None:
        raise ItdaInputError("--layers takes a model, and neither --layer nor --hookpoint")
    if out.exists() and not out.is_dir():
        raise ItdaInputError(f"{out}: --out is a file; with --layers it is a folder")
    if checkpoint is not None and (Path(checkpoint).resolve() == out.resolve() or Path(checkpoint).is_file()):
        raise ItdaInputError(f"{checkpoint}: with --layers --checkpoint is a folder other than --out")
    corpus = [] if params["corpus"] == "default" else [Path(params["corpus"])]
    for hp in parse_hookpoints(params["layers"]):
        check_output(out / f"{hp.name}.safetensors", [Path(source)] + corpus, "sae", params["overwrite"])
    options = _offered(params, SaeSpec, TrainConfig, CorpusConfig, ModelSource, drop=("latents", "device"))
    if checkpoint is not None:
        on_interrupt(f"checkpoints saved in {checkpoint}; run the same command to resume")
    started = time.perf_counter()
    saes = train_saes(
        source,
        params["layers"],
        latents=params["latents"],
        out=out,
        distribute_hookpoints=params["distribute_hookpoints"],
        device=str(check_device(params["device"])),
        progress=not params["quiet"],
        checkpoint=checkpoint,
        checkpoint_every=params["checkpoint_every"],
        on_model=print_model_header if root else None,
        max_memory=parse_memory(params["max_memory"]),
        **{k: v for k, v in options.items() if k != "max_memory"},
    )
    if root:
        seconds = time.perf_counter() - started
        typer.echo(f"{out}: {len(saes)} SAEs trained here ({', '.join(saes)}) in {seconds:.1f}s")


def _train_arguments(params: dict[str, Any], root: bool, started: list[float]) -> dict[str, Any]:
    """itda.train_sae's arguments from the command's options (inputs and --out checked first)."""
    source, checkpoint, out = params["source"], params["checkpoint"], params["out"]
    from_file = is_activation_file(source)
    corpus = [] if from_file or params["corpus"] == "default" else [Path(params["corpus"])]
    check_checkpoint(None if checkpoint is None else Path(checkpoint), [Path(out)], [])
    check_output(out, [Path(source)] + corpus + ([checkpoint] if checkpoint else []), "sae", params["overwrite"])
    device = str(check_device(params["device"]))
    options = _offered(params, SaeSpec, TrainConfig, drop=("latents",))
    # a file's layer or hookpoint is recorded, so exports name it
    options.update(layer=params["layer"], hookpoint=params["hookpoint"])
    if not from_file:
        options.update(_offered(params, CorpusConfig, ModelSource, drop=("device",)))
        header = print_model_header if root else None
        options.update(model=source, on_model=header, max_memory=parse_memory(params["max_memory"]))
    return dict(
        data=source if from_file else None,
        latents=params["latents"],
        device=device,
        progress=not params["quiet"],
        checkpoint=checkpoint,
        checkpoint_every=params["checkpoint_every"],
        out=out,
        on_start=_start_line(params, started),
        **options,
    )


def _print_trained(loaded, params: dict[str, Any], seconds: float) -> None:
    """The trained SAE's line (and its held-out summary)."""
    train = loaded.meta.train
    learned = f", threshold {train['threshold']:.4g}" if "threshold" in train else ""
    typer.echo(
        f"{params['out']}: {params['latents']} latents, k={params['k']}{learned}, {train['tokens']} tokens in "
        f"{seconds:.1f}s"
    )
    if "heldout" in train:
        print_summary(train["heldout"])


def _offered(params: dict[str, Any], *configs: type, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The command's options that are fields of `configs` (those it offers), less `drop`."""
    names = {f.name for c in configs for f in dataclasses.fields(c)} - set(drop)
    return {name: value for name, value in params.items() if name in names}


def _start_line(params: dict[str, Any], started: list[float]):
    """train_sae's on_start for the command's options `params`: the interrupt note, the run's first line, and
    the start time appended to `started` (printed, never stored: a resumed run must write the same bytes)."""
    checkpoint = params["checkpoint"]

    def on_start(trainer, info: dict) -> None:
        if checkpoint is not None:
            on_interrupt(f"checkpoint saved at {checkpoint}; run the same command to resume")
        if not params["quiet"]:
            name = "" if trainer.sae.cfg.arch == "topk" else f" {trainer.sae.cfg.arch}"
            typer.echo(
                f"SAE{name} d={trainer.sae.cfg.d_in}, {params['latents']} latents, k={params['k']}, "
                f"init {info['init']}, lr {trainer.lr:.3g}, {params['steps']} steps of {params['batch_size']} tokens"
            )
        started.append(time.perf_counter())

    return on_start


@sae_app.command("eval")
@user_errors
def eval_cmd(
    sae_path: Path = typer.Argument(..., metavar="SAE", help="itda SAE file, SAELens folder or sparsify folder."),
    acts: Path | None = typer.Argument(None, help="Activation file (or use --model)."),
    model: str | None = typer.Option(
        None, help="Evaluate on a model's held-out activations (default: the SAE's model)."
    ),
    corpus: str = option(CorpusConfig, "corpus", help="With a model: corpus (its held-out split is used)."),
    field: str = option(CorpusConfig, "field"),
    tokens: int = typer.Option(16_384, help="With a model: held-out tokens."),
    context: int = option(CorpusConfig, "context"),
    ce: bool = typer.Option(True, help="With a causal LM: the CE-loss score with the SAE spliced in."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
    device: str = option(ModelSource, "device"),
    layerwise: bool | None = option(ModelSource, "layerwise", "--layerwise/--in-memory"),
    max_memory: str | None = option(ModelSource, "max_memory"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that itda did not write."),
) -> None:
    """FVU, mean cosine, L0, dead latents (and the CE-loss score on a model, as `itda eval`)."""
    from itda.api import evaluate
    from itda.cli.outputs import Output, check_outputs
    from itda.sae.io import load_sae

    outputs = [Output(out, "sae-eval-report")] if out is not None else []
    check_outputs(outputs, [sae_path, acts, model], overwrite)
    device = str(check_device(device))
    loaded = load_sae(sae_path, device=device)
    if acts is not None:
        from itda.activations.files import load_activations

        data = load_activations(acts)
        if data.d != loaded.sae.cfg.d_in:
            raise ItdaInputError(
                f"dimension mismatch: {acts} has d={data.d}, {sae_path} has d_in={loaded.sae.cfg.d_in}"
            )
        report = evaluate(loaded, data)
    else:
        model = model or loaded.meta.model
        if not model:
            raise ItdaInputError(f"{sae_path}: no model recorded; give an activation file or --model")
        on_model: dict[str, Any] = dict(
            corpus=corpus, field=field, tokens=tokens, context=context, ce=ce, device=device
        )
        report = evaluate(loaded, model=model, **on_model, layerwise=layerwise, max_memory=parse_memory(max_memory))
    write_report(report.summary(), out, outputs)


@user_errors
def export(
    source: Path = typer.Argument(..., help="An itda dictionary or SAE file (or a SAELens/sparsify folder)."),
    format: ExportFormat = typer.Option(..., "--format", help="saelens, sparsify or saelens-mp (a dictionary)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced only if it is an earlier export)."),
    k: int | None = typer.Option(None, help="Dictionary input: TopK k or MP steps (default: the dictionary's k)."),
    signed: bool = typer.Option(
        True, "--signed/--plain", help="saelens-mp: ±atoms (2N latents, ITDA's signed MP) or the atoms only."
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an earlier export folder that was changed since itda wrote it."
    ),
) -> None:
    """Write an SAE (or a dictionary as a TopK SAE, or as SAELens's matching-pursuit SAE) in a format
    SAELens or sparsify loads natively."""
    from itda.api import export as export_sae
    from itda.cli.outputs import Output, check_outputs, record_outputs
    from itda.sae.io import load_sae

    outputs = [Output(out, f"{format.value}-export", folder=True)]
    check_outputs(outputs, [source], overwrite)
    where = export_sae(source, format.value, out, k=k, signed=signed)
    record_outputs(outputs)
    if format is ExportFormat.saelens_mp:
        import json

        cfg = json.loads((where / "cfg.json").read_text())
        form = "signed (±atoms)" if cfg["metadata"]["itda_dictionary"]["signed"] else "plain (non-negative)"
        typer.echo(
            f"{where}: saelens matching_pursuit SAE, {form}, d_in={cfg['d_in']}, {cfg['d_sae']} latents, "
            f"{cfg['max_iterations']} MP steps"
        )
        return
    sae = load_sae(where).sae  # read back as the SAE libraries will read it
    cfg = sae.cfg
    form = "TopK" if cfg.arch == "topk" else f"JumpReLU ({cfg.arch}, threshold {sae.inference_threshold():.4g})"
    typer.echo(f"{where}: {format.value} {form} SAE, d_in={cfg.d_in}, {cfg.n_latents} latents, k={cfg.k}")
