"""`itda sae train|eval` and `itda export`: thin wrappers over itda.sae."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from itda.cli.common import check_device, check_output, is_activation_file, on_interrupt, parse_memory, user_errors
from itda.errors import ItdaInputError

sae_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sparse autoencoders seeded from ITDA dictionaries.")


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
    latents: int = typer.Option(..., "--latents", help="Number of latents F."),
    k: int = typer.Option(32, help="Active latents per token."),
    init: str = typer.Option("kaiming", help="kaiming, orthogonal, data, mean-subtracted, centroid-subtracted, outliers, itda:DICT, transfer:SAE_OR_DICT."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    batch_size: int = typer.Option(4096, help="Tokens per step."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (default 2e-4 / sqrt(F / 2^14))."),
    b_dec: str = typer.Option("median", help="Decoder bias from the init sample: median (geometric), mean or zero."),
    fill: Optional[str] = typer.Option("data", help="itda/transfer init with more latents than atoms: fill the rest with 'data' or 'kaiming' rows."),
    crop: bool = typer.Option(False, help="itda/transfer init with fewer latents than atoms: keep the first atoms."),
    batch_topk: bool = typer.Option(False, help="Train with BatchTopK (B*k activations per batch); inference stays TopK."),
    auxk_alpha: float = typer.Option(1 / 32, help="Weight of the AuxK loss."),
    dead_after_tokens: int = typer.Option(1_000_000, help="A latent is dead after this many tokens without firing."),
    resample: Optional[str] = typer.Option(None, help="'itda': replace dead latents by the worst-reconstructed activations."),
    resample_every: int = typer.Option(200, help="Steps between resamplings."),
    seed: int = typer.Option(0),
    init_sample: int = typer.Option(16_384, help="Activations the init and b_dec are computed from."),
    holdout: float = typer.Option(0.05, help="Activation file: fraction of rows (the last ones) held out for the final evaluation."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file; an existing one is resumed."),
    checkpoint_every: int = typer.Option(100, help="Steps between checkpoints."),
    layer: Optional[int] = typer.Option(None, "--layer", "-l", help="Model input: block index (resid_post)."),
    hookpoint: Optional[str] = typer.Option(None, help="Model input: hookpoint name instead of --layer."),
    corpus: str = typer.Option("default", help="Model input: corpus (its training split)."),
    field: str = typer.Option("text"),
    context: int = typer.Option(128),
    batch_tokens: int = typer.Option(4096, help="Model input: tokens per forward pass."),
    layerwise: Optional[bool] = typer.Option(None, "--layerwise/--in-memory"),
    max_memory: Optional[str] = typer.Option(None, help="Model input: memory budget (e.g. 8GB) for layer-wise execution."),
    device: str = typer.Option("cpu"),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an itda SAE."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a TopK SAE on an activation file or a model's activations, from any initialisation."""
    from itda.resources import check_fits
    from itda.sae.init import parse_init
    from itda.sae.io import save_sae
    from itda.sae.model import SaeConfig, activation_units
    from itda.sae.train import ScaledBatches, TrainConfig, training_bytes

    if latents < 1 or not (1 <= k <= latents):
        raise ItdaInputError(f"need --latents >= 1 and 1 <= --k <= --latents, got latents={latents}, k={k}")
    if batch_size < 1 or init_sample < 1 or batch_tokens < 1:
        raise ItdaInputError("--batch-size, --init-sample and --batch-tokens must be >= 1")
    if batch_size < 2:
        raise ItdaInputError(f"--batch-size must be >= 2 (the FVU loss needs a batch's variance), got {batch_size}")
    if checkpoint is not None and checkpoint_every < 1:
        raise ItdaInputError("--checkpoint-every must be >= 1 with --checkpoint")
    inputs = ([Path(source)] if is_activation_file(source) else []) + ([checkpoint] if checkpoint else [])
    check_output(out, inputs, "sae", overwrite)
    check_device(device)
    spec = parse_init(init)
    config = TrainConfig(steps=steps, lr=lr, auxk_alpha=auxk_alpha, dead_after_tokens=dead_after_tokens,
                         resample=resample, resample_every=resample_every, seed=seed)
    config.validate()
    if is_activation_file(source):
        stream, sample, d, meta, evaluate = _file_source(Path(source), batch_size, seed, init_sample, holdout)
    else:
        stream, sample, d, meta, evaluate = _model_source(source, layer, hookpoint, corpus, field, context, steps * batch_size,
                                                          batch_size, batch_tokens, init_sample, layerwise,
                                                          parse_memory(max_memory), device)
    cfg = SaeConfig(d, latents, k, batch_topk)
    check_fits(training_bytes(cfg, batch_size), f"training an SAE of {latents} latents x d={d} (batch {batch_size})", device)
    units = activation_units(sample)  # 1.0 for ordinary activations; extreme ones train in power-of-two units
    fingerprint = {"source": str(source), "d": d, "batch_size": batch_size, "sample_sum": float(sample.double().sum()),
                   "units": units}
    trainer, info = _trainer(cfg, config, spec, sample, units, checkpoint, fingerprint, device,
                             dict(seed=seed, b_dec=b_dec, fill=fill, crop=crop))
    if not quiet:
        typer.echo(f"SAE d={d}, {latents} latents, k={k}, init {info['init']}, lr {trainer.lr:.3g}, {steps} steps of {batch_size} tokens")
    if checkpoint is not None:
        on_interrupt(f"checkpoint saved at {checkpoint}; run the same command to resume")
    t0 = time.perf_counter()
    # checkpoints carry the run's identity so that a resume with other data is refused
    trainer.fit(stream if units == 1.0 else ScaledBatches(stream, 1.0 / units), checkpoint=checkpoint,
                checkpoint_every=checkpoint_every if checkpoint else 0,
                checkpoint_extra={"fingerprint": fingerprint, "init": info}, progress=not quiet)
    seconds = time.perf_counter() - t0  # printed, never stored: a resumed run must write the same bytes
    trainer.sae.scale_biases_(units)  # from training units back to the activations' own (exact)
    meta.init = info
    meta.train = {**config.__dict__, "lr": trainer.lr, "batch_size": batch_size, "batch_topk": batch_topk,
                  "tokens": trainer.tokens_seen, "units": units, "final_train_fvu": trainer.last_fvu,
                  "resampled": trainer.resampled_total}
    summary = evaluate(trainer.sae) if evaluate else None
    if summary:
        meta.train["heldout"] = summary
    save_sae(trainer.sae, out, meta)
    if checkpoint is not None:
        from itda.atomic import remove_stale_temps

        checkpoint.unlink(missing_ok=True)
        remove_stale_temps(checkpoint)  # what writers killed mid-checkpoint left
    typer.echo(f"{out}: {latents} latents, k={k}, {trainer.tokens_seen} tokens in {seconds:.1f}s")
    if summary:
        _print_summary(summary)


def _trainer(cfg, config, spec, sample, units: float, checkpoint: Optional[Path], fingerprint: dict, device: str,
             init_kwargs: dict):
    """(trainer, init record): resumed from a checkpoint made by this same run, or new with its SAE in `units`."""
    from itda.sae.init import new_sae
    from itda.sae.train import SaeTrainer

    if checkpoint is not None and checkpoint.exists():
        trainer, extra = SaeTrainer.load_checkpoint(checkpoint, device=device)
        if (trainer.sae.cfg != cfg or trainer.config != config or extra.get("fingerprint") != fingerprint
                or not isinstance(extra.get("init"), dict)):
            raise ItdaInputError(f"{checkpoint}: checkpoint was made with other settings or data; remove it or change --checkpoint")
        return trainer, extra["init"]
    sae, info = new_sae(cfg, spec, sample, device=device, **init_kwargs)
    sae.scale_biases_(1.0 / units)
    return SaeTrainer(sae, config), info


def _file_source(path: Path, batch_size: int, seed: int, init_sample: int, holdout: float):
    import torch

    from itda.activations.files import load_activations
    from itda.sae.evaluate import evaluate_sae
    from itda.sae.io import SaeMeta
    from itda.sae.train import shuffled_batches

    if not (0.0 <= holdout < 1.0):
        raise ItdaInputError(f"--holdout must be in [0, 1), got {holdout}")
    data = load_activations(path)
    n_train = len(data) - int(round(holdout * len(data)))
    train_rows = data.acts[:n_train].to(torch.float32)
    held = data.acts[n_train:].to(torch.float32)
    if len(held) and bool((held == held[:1]).all()):
        raise ItdaInputError(f"{path}: the {len(held)} held-out row(s) of --holdout {holdout} have no variance, so FVU is "
                             "undefined; change --holdout (0: none)")
    gen = torch.Generator().manual_seed(seed)
    sample = train_rows[torch.randperm(n_train, generator=gen)[: min(init_sample, n_train)]]
    evaluate = (lambda sae: evaluate_sae(sae, held.split(8192)).summary()) if len(held) else None
    return shuffled_batches(train_rows, batch_size, seed), sample, data.d, SaeMeta(), evaluate


def _model_source(source, layer, hookpoint, corpus, field, context, tokens, batch_size, batch_tokens, init_sample,
                  layerwise, max_memory, device):
    import itertools

    import torch

    from itda.activations.corpus import load_contexts
    from itda.activations.hookpoints import parse_hookpoint
    from itda.activations.models import load_model
    from itda.activations.stream import iterate_dense
    from itda.sae.io import SaeMeta
    from itda.sae.train import rebatch

    if (layer is None) == (hookpoint is None):
        raise ItdaInputError("a model source needs exactly one of --layer and --hookpoint")
    hp = parse_hookpoint(str(layer)) if layer is not None else parse_hookpoint(hookpoint)
    lm = load_model(source, device=device, layerwise=layerwise, max_memory=max_memory, max_layer=hp.layer if hp.layer >= 0 else None)
    _docs, contexts = load_contexts(corpus, lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train",
                                    tokens=tokens + init_sample, context=context, field=field)
    per = max(1, batch_tokens // context)

    def stream():
        return rebatch(iterate_dense(lm.model, hp, contexts, batch_contexts=per, device=device), batch_size)

    sample = torch.cat(list(itertools.islice(iterate_dense(lm.model, hp, contexts, batch_contexts=per, device=device),
                                             max(1, init_sample // (per * context)) + 1)))[:init_sample]
    meta = SaeMeta(model=source, hookpoint=hp.name, tokenizer=lm.tokenizer_name)

    class _Stream:  # re-iterable: a resumed run restarts the stream and skips the steps done
        def __iter__(self):
            return stream()

    return _Stream(), sample.cpu(), sample.shape[1], meta, None


@sae_app.command("eval")
@user_errors
def eval_cmd(
    sae_path: Path = typer.Argument(..., metavar="SAE", help="itda SAE file, SAELens folder or sparsify folder."),
    acts: Optional[Path] = typer.Argument(None, help="Activation file (or use --model)."),
    model: Optional[str] = typer.Option(None, help="Evaluate on a model's held-out activations (default: the SAE's model)."),
    corpus: str = typer.Option("default"),
    field: str = typer.Option("text"),
    tokens: int = typer.Option(16_384, help="With a model: held-out tokens."),
    context: int = typer.Option(128),
    ce: bool = typer.Option(True, help="With a causal LM: the CE-loss score with the SAE spliced in."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
    device: str = typer.Option("cpu"),
    layerwise: Optional[bool] = typer.Option(None, "--layerwise/--in-memory"),
    max_memory: Optional[str] = typer.Option(None),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that itda did not write."),
) -> None:
    """FVU, mean cosine, L0, dead latents (and the CE-loss score on a model, as `itda eval`)."""
    from itda.atomic import write_text_atomic
    from itda.cli.outputs import Output, check_outputs, record_outputs
    from itda.sae.io import load_sae

    outputs = [Output(out, "sae-eval-report")] if out is not None else []
    check_outputs(outputs, [sae_path, acts, model], overwrite)
    loaded = load_sae(sae_path, device=check_device(device))
    if acts is not None:
        from itda.activations.files import load_activations
        from itda.sae.evaluate import evaluate_sae

        data = load_activations(acts)
        if data.d != loaded.sae.cfg.d_in:
            raise ItdaInputError(f"dimension mismatch: {acts} has d={data.d}, {sae_path} has d_in={loaded.sae.cfg.d_in}")
        summary = evaluate_sae(loaded.sae, (x for x, _ in data.batches(8192))).summary()
    else:
        from itda.evaluation.on_model import evaluate_on_model

        model = model or loaded.meta.model
        if not model:
            raise ItdaInputError(f"{sae_path}: no model recorded; give an activation file or --model")
        summary = evaluate_on_model(loaded, model, corpus=corpus, field=field, tokens=tokens, context=context, ce=ce,
                                    device=device, layerwise=layerwise, max_memory=parse_memory(max_memory)).summary()
    if out is not None:
        write_text_atomic(out, json.dumps(summary, indent=2))
        record_outputs(outputs)
    _print_summary(summary)


@user_errors
def export(
    source: Path = typer.Argument(..., help="An itda dictionary or SAE file (or a SAELens/sparsify folder)."),
    format: ExportFormat = typer.Option(..., "--format", help="saelens or sparsify."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (replaced only if it is an earlier export)."),
    k: Optional[int] = typer.Option(None, help="Dictionary input: TopK k (default: the dictionary's k)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export folder that was changed since itda wrote it."),
) -> None:
    """Write an SAE (or a dictionary as a TopK SAE) in a format SAELens or sparsify loads natively."""
    from itda.cli.outputs import Output, check_outputs, record_outputs
    from itda.sae.io import export_saelens, export_sparsify, load_sae_or_none

    outputs = [Output(out, f"{format.value}-export", folder=True)]
    check_outputs(outputs, [source], overwrite)
    loaded = load_sae_or_none(source)
    if loaded is None:
        from itda.dictionary import Dictionary
        from itda.sae.io import dictionary_as_sae

        loaded = dictionary_as_sae(Dictionary.load(source), k)
    where = export_saelens(*loaded, out) if format is ExportFormat.saelens else export_sparsify(*loaded, out)
    record_outputs(outputs)
    cfg = loaded.sae.cfg
    typer.echo(f"{where}: {format.value} TopK SAE, d_in={cfg.d_in}, {cfg.n_latents} latents, k={cfg.k}")
