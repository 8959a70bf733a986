"""`itda sae train|eval` and `itda export`: thin wrappers over itda.sae."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path

import typer

from itda.activations.config import CorpusConfig, ModelSource
from itda.cli.common import (
    check_device,
    check_output,
    is_activation_file,
    on_interrupt,
    parse_memory,
    print_model_header,
    user_errors,
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


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        typer.echo(f"{key:16s} {value:.6g}" if isinstance(value, float) else f"{key:16s} {value}")


@sae_app.command("train")
@user_errors
def train(
    source: str = typer.Argument(..., help="An activation file (.safetensors / .npy) or a model (with --layer)."),
    out: Path = typer.Option(..., "--out", "-o", help="SAE file to write (.safetensors)."),
    latents: int = option(SaeSpec, "latents", "--latents"),
    k: int = option(SaeSpec, "k"),
    init: str = option(SaeSpec, "init"),
    steps: int = option(TrainConfig, "steps"),
    batch_size: int = option(SaeSpec, "batch_size"),
    lr: float | None = option(TrainConfig, "lr"),
    b_dec: str = option(SaeSpec, "b_dec"),
    fill: str | None = option(SaeSpec, "fill"),
    crop: bool = option(SaeSpec, "crop"),
    batch_topk: bool = option(SaeSpec, "batch_topk"),
    auxk_alpha: float = option(TrainConfig, "auxk_alpha"),
    dead_after_tokens: int = option(TrainConfig, "dead_after_tokens"),
    resample: str | None = option(TrainConfig, "resample"),
    resample_every: int = option(TrainConfig, "resample_every"),
    seed: int = option(TrainConfig, "seed"),
    init_sample: int = option(SaeSpec, "init_sample"),
    holdout: float = option(SaeSpec, "holdout"),
    checkpoint: Path | None = typer.Option(None, help="Checkpoint file; an existing one is resumed."),
    checkpoint_every: int = typer.Option(100, help="Steps between checkpoints."),
    layer: int | None = typer.Option(None, "--layer", "-l", help="Model input: block index (resid_post)."),
    hookpoint: str | None = typer.Option(None, help="Model input: hookpoint name instead of --layer."),
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
    """Train a TopK SAE on an activation file or a model's activations, from any initialisation."""
    from itda.resources import check_fits
    from itda.sae.init import parse_init
    from itda.sae.io import save_sae
    from itda.sae.model import SaeConfig, activation_units
    from itda.sae.train import training_bytes

    spec = SaeSpec(latents, k, init, batch_size, b_dec, fill, crop, batch_topk, init_sample, holdout)
    spec.validate()
    if checkpoint is not None and checkpoint_every < 1:
        raise ItdaInputError("--checkpoint-every must be >= 1 with --checkpoint")
    inputs = ([Path(source)] if is_activation_file(source) else []) + ([checkpoint] if checkpoint else [])
    check_output(out, inputs, "sae", overwrite)
    device = str(check_device(device))
    init_spec = parse_init(init)
    config = TrainConfig(
        steps,
        lr,
        auxk_alpha,
        dead_after_tokens=dead_after_tokens,
        resample=resample,
        resample_every=resample_every,
        seed=seed,
    )
    config.validate()
    if is_activation_file(source):
        stream, sample, d, meta, evaluate = _file_source(Path(source), spec, seed)
    else:
        model = ModelSource(source, device, model_dtype, layerwise, parse_memory(max_memory), revision, offline)
        corpus_config = CorpusConfig(
            corpus, field, split, dataset_config, tokens=steps * batch_size, context=context, batch_tokens=batch_tokens
        )
        stream, sample, d, meta, evaluate = _model_source(model, corpus_config, spec, layer, hookpoint)
    cfg = SaeConfig(d, latents, k, batch_topk)
    check_fits(
        training_bytes(cfg, batch_size), f"training an SAE of {latents} latents x d={d} (batch {batch_size})", device
    )
    units = activation_units(sample)  # 1.0 for ordinary activations; extreme ones train in power-of-two units
    fingerprint = dict(
        source=str(source), d=d, batch_size=batch_size, sample_sum=float(sample.double().sum()), units=units
    )
    init_kwargs = dict(seed=seed, b_dec=b_dec, fill=fill, crop=crop)
    trainer, info = _trainer(cfg, config, init_spec, sample, units, checkpoint, fingerprint, device, init_kwargs)
    if not quiet:
        typer.echo(
            f"SAE d={d}, {latents} latents, k={k}, init {info['init']}, lr {trainer.lr:.3g}, "
            f"{steps} steps of {batch_size} tokens"
        )
    seconds = _fit(
        trainer, stream, units, checkpoint, checkpoint_every, {"fingerprint": fingerprint, "init": info}, quiet
    )
    meta.init = info
    meta.train = _train_record(config, trainer, spec, units)
    summary = evaluate(trainer.sae) if evaluate else None
    if summary:
        meta.train["heldout"] = summary
    save_sae(trainer.sae, out, meta)
    _remove_checkpoint(checkpoint)
    typer.echo(f"{out}: {latents} latents, k={k}, {trainer.tokens_seen} tokens in {seconds:.1f}s")
    if summary:
        _print_summary(summary)


def _train_record(config, trainer, spec: SaeSpec, units: float) -> dict:
    """What the SAE file records of its training (no wall-clock value: resumed runs write the same bytes)."""
    return {
        **config.__dict__,
        "lr": trainer.lr,
        "batch_size": spec.batch_size,
        "batch_topk": spec.batch_topk,
        "tokens": trainer.tokens_seen,
        "units": units,
        "final_train_fvu": trainer.last_fvu,
        "resampled": trainer.resampled_total,
    }


def _fit(trainer, stream, units: float, checkpoint: Path | None, every: int, extra: dict, quiet: bool) -> float:
    """Train to the end (resumable; in power-of-two `units`, biases scaled back after); the wall-clock seconds."""
    from itda.sae.train import ScaledBatches

    if checkpoint is not None:
        on_interrupt(f"checkpoint saved at {checkpoint}; run the same command to resume")
    t0 = time.perf_counter()
    # checkpoints carry the run's identity (extra) so that a resume with other data is refused
    trainer.fit(
        stream if units == 1.0 else ScaledBatches(stream, 1.0 / units),
        checkpoint=checkpoint,
        checkpoint_every=every if checkpoint else 0,
        checkpoint_extra=extra,
        progress=not quiet,
    )
    trainer.sae.scale_biases_(units)  # from training units back to the activations' own (exact)
    return time.perf_counter() - t0  # printed, never stored: a resumed run must write the same bytes


def _remove_checkpoint(checkpoint: Path | None) -> None:
    """After a finished run: the checkpoint and what writers killed mid-checkpoint left beside it."""
    if checkpoint is not None:
        from itda.atomic import remove_stale_temps

        checkpoint.unlink(missing_ok=True)
        remove_stale_temps(checkpoint)


def _trainer(
    cfg,
    config,
    spec,
    sample,
    units: float,
    checkpoint: Path | None,
    fingerprint: dict,
    device: str,
    init_kwargs: dict,
):
    """(trainer, init record): resumed from a checkpoint made by this same run, or new with its SAE in `units`."""
    from itda.sae.init import new_sae
    from itda.sae.train import SaeTrainer

    if checkpoint is not None and checkpoint.exists():
        trainer, extra = SaeTrainer.load_checkpoint(checkpoint, device=device)
        if (
            trainer.sae.cfg != cfg
            or trainer.config != config
            or extra.get("fingerprint") != fingerprint
            or not isinstance(extra.get("init"), dict)
        ):
            raise ItdaInputError(
                f"{checkpoint}: checkpoint was made with other settings or data; remove it or change --checkpoint"
            )
        return trainer, extra["init"]
    sae, info = new_sae(cfg, spec, sample, device=device, **init_kwargs)
    sae.scale_biases_(1.0 / units)
    return SaeTrainer(sae, config), info


def _file_source(path: Path, spec: SaeSpec, seed: int):
    """(batches, init sample, d, meta, held-out evaluation) of an activation file; the last rows are held out."""
    import torch

    from itda.activations.files import load_activations
    from itda.sae.evaluate import evaluate_sae
    from itda.sae.io import SaeMeta
    from itda.sae.train import shuffled_batches

    holdout, batch_size, init_sample = spec.holdout, spec.batch_size, spec.init_sample
    data = load_activations(path)
    n_train = len(data) - int(round(holdout * len(data)))
    train_rows = data.acts[:n_train].to(torch.float32)
    held = data.acts[n_train:].to(torch.float32)
    if len(held) and bool((held == held[:1]).all()):
        raise ItdaInputError(
            f"{path}: the {len(held)} held-out row(s) of --holdout {holdout} have no variance, so FVU is "
            "undefined; change --holdout (0: none)"
        )
    gen = torch.Generator().manual_seed(seed)
    sample = train_rows[torch.randperm(n_train, generator=gen)[: min(init_sample, n_train)]]
    evaluate = (lambda sae: evaluate_sae(sae, held.split(8192)).summary()) if len(held) else None
    return shuffled_batches(train_rows, batch_size, seed), sample, data.d, SaeMeta(), evaluate


def _model_source(model: ModelSource, corpus: CorpusConfig, spec: SaeSpec, layer: int | None, hookpoint: str | None):
    """(re-iterable batches, init sample, d, meta, None) of a model's activations at one hookpoint."""
    import itertools

    import torch

    from itda.activations.corpus import load_contexts
    from itda.activations.hookpoints import parse_hookpoint
    from itda.activations.stream import iterate_dense
    from itda.sae.io import SaeMeta
    from itda.sae.train import rebatch

    corpus.validate()
    source, device, init_sample, context = model.model, model.device, spec.init_sample, corpus.context
    assert source is not None  # train() makes the ModelSource from its SOURCE argument
    if layer is not None and hookpoint is None:
        hp = parse_hookpoint(str(layer))
    elif hookpoint is not None and layer is None:
        hp = parse_hookpoint(hookpoint)
    else:
        raise ItdaInputError("a model source needs exactly one of --layer and --hookpoint")
    lm = model.load(max_layer=hp.layer if hp.layer >= 0 else None)
    _docs, contexts = load_contexts(
        corpus.source,
        lm.tokenizer,
        tokenizer_name=lm.tokenizer_name,
        split="train",
        tokens=corpus.tokens + init_sample,
        context=context,
        field=corpus.field,
    )
    per = corpus.batch_contexts
    print_model_header(lm)

    def stream():
        return rebatch(iterate_dense(lm.model, hp, contexts, batch_contexts=per, device=device), spec.batch_size)

    sample = torch.cat(
        list(
            itertools.islice(
                iterate_dense(lm.model, hp, contexts, batch_contexts=per, device=device),
                max(1, init_sample // (per * context)) + 1,
            )
        )
    )[:init_sample]
    meta = SaeMeta(model=source, hookpoint=hp.name, tokenizer=lm.tokenizer_name)

    class _Stream:  # re-iterable: a resumed run restarts the stream and skips the steps done
        def __iter__(self):
            return stream()

    return _Stream(), sample.cpu(), sample.shape[1], meta, None


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
    from itda.atomic import write_text_atomic
    from itda.cli.outputs import Output, check_outputs, record_outputs
    from itda.sae.io import load_sae

    outputs = [Output(out, "sae-eval-report")] if out is not None else []
    check_outputs(outputs, [sae_path, acts, model], overwrite)
    device = str(check_device(device))
    loaded = load_sae(sae_path, device=device)
    if acts is not None:
        from itda.activations.files import load_activations
        from itda.sae.evaluate import evaluate_sae

        data = load_activations(acts)
        if data.d != loaded.sae.cfg.d_in:
            raise ItdaInputError(
                f"dimension mismatch: {acts} has d={data.d}, {sae_path} has d_in={loaded.sae.cfg.d_in}"
            )
        summary = evaluate_sae(loaded.sae, (x for x, _ in data.batches(8192))).summary()
    else:
        from itda.evaluation.on_model import evaluate_on_model

        model = model or loaded.meta.model
        if not model:
            raise ItdaInputError(f"{sae_path}: no model recorded; give an activation file or --model")
        summary = evaluate_on_model(
            loaded,
            model,
            corpus=corpus,
            field=field,
            tokens=tokens,
            context=context,
            ce=ce,
            device=device,
            layerwise=layerwise,
            max_memory=parse_memory(max_memory),
        ).summary()
    if out is not None:
        write_text_atomic(out, json.dumps(summary, indent=2))
        record_outputs(outputs)
    _print_summary(summary)


@user_errors
def export(
    source: Path = typer.Argument(..., help="An itda dictionary or SAE file (or a SAELens/sparsify folder)."),
    format: ExportFormat = typer.Option(..., "--format", help="saelens or sparsify."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced only if it is an earlier export)."),
    k: int | None = typer.Option(None, help="Dictionary input: TopK k (default: the dictionary's k)."),
    overwrite: bool = typer.Option(
        False, help="Replace an earlier export folder that was changed since itda wrote it."
    ),
) -> None:
    """Write an SAE (or a dictionary as a TopK SAE) in a format SAELens or sparsify loads natively."""
    from itda.api import export as export_sae
    from itda.cli.outputs import Output, check_outputs, record_outputs
    from itda.sae.io import load_sae

    outputs = [Output(out, f"{format.value}-export", folder=True)]
    check_outputs(outputs, [source], overwrite)
    where = export_sae(source, format.value, out, k=k)
    record_outputs(outputs)
    cfg = load_sae(where).sae.cfg  # read back as the SAE libraries will read it
    typer.echo(f"{where}: {format.value} TopK SAE, d_in={cfg.d_in}, {cfg.n_latents} latents, k={cfg.k}")
