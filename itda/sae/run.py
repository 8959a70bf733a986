"""One SAE training run, as `itda sae train` and itda.train_sae both run it.

A TrainSource says where the activations come from (rows in memory, the last ones held out, or a
model's activations at one hookpoint); run_training initialises (or resumes from a checkpoint made
by the same run), trains in power-of-two units when the activations are extreme, evaluates the
held-out rows and returns the SAE with its record. Nothing of the wall clock is recorded, so a
resumed run gives the same SAE, byte for byte, as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from itda.activations.config import CorpusConfig, ModelSource
from itda.activations.corpus import Contexts
from itda.activations.models import LoadedModel
from itda.configfields import FieldError
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.io import LoadedSae, SaeMeta
from itda.sae.train import SaeSpec, SaeTrainer, TrainConfig

HELDOUT_BATCH = 8192  # held-out rows evaluated per batch


class TrainSource(NamedTuple):
    """A run's activations: re-iterable training batches, the init sample, d, the SAE's meta, the held-out
    evaluation (None: nothing held out) and the source's name (in the checkpoint's fingerprint)."""

    stream: Iterable[Tensor]
    sample: Tensor
    d: int
    meta: SaeMeta
    evaluate: Callable[[Any], dict] | None
    name: str


def rows_source(
    rows: Tensor, spec: SaeSpec, seed: int, name: str, where: str | None = None, group: BatchGroup = SINGLE
) -> TrainSource:
    """Rows in memory (an activation file's, or a tensor) named `name` (`where` in messages; default name):
    the last spec.holdout of them held out. Under torchrun (`group`) each rank gets its equal shard of
    every batch, so the ranks together see the batches of one process."""
    from itda.sae.evaluate import evaluate_sae
    from itda.sae.train import shuffled_batches

    holdout, init_sample = spec.holdout, spec.init_sample
    n_train = len(rows) - int(round(holdout * len(rows)))
    train_rows = rows[:n_train].to(torch.float32)
    held = rows[n_train:].to(torch.float32)
    if len(held) and bool((held == held[:1]).all()):
        raise FieldError(
            "holdout",
            f"{where or name}: the {len(held)} held-out row(s) of {{field}} {holdout} have no variance, so FVU is "
            "undefined; change {field} (0: none)",
        )
    gen = torch.Generator().manual_seed(seed)
    sample = train_rows[torch.randperm(n_train, generator=gen)[: min(init_sample, n_train)]]
    evaluate = (lambda sae: evaluate_sae(sae, held.split(HELDOUT_BATCH)).summary()) if len(held) else None
    stream = shard_batches(shuffled_batches(train_rows, spec.batch_size, seed), group, spec.batch_size)
    return TrainSource(stream, sample, rows.shape[1], SaeMeta(), evaluate, name)


def rank_batch_size(batch_size: int, group: BatchGroup) -> int:
    """Rows of a batch each rank holds; refused unless the ranks split it evenly."""
    if batch_size % group.world:
        raise FieldError("batch_size", f"must be a multiple of the {group.world} ranks, got {batch_size}")
    return batch_size // group.world


def shard_batches(batches: Iterable[Tensor], group: BatchGroup, batch_size: int) -> Iterable[Tensor]:
    """This rank's rows of every batch: the rank-th of `world` equal slices (the batches when alone)."""
    if not group.distributed:
        return batches
    part = rank_batch_size(batch_size, group)
    return (x[group.rank * part : (group.rank + 1) * part] for x in batches)


def rank_contexts(contexts: Contexts, group: BatchGroup) -> Contexts:
    """This rank's contexts: rank, rank + W, ... (all of them when alone)."""
    if not group.distributed:
        return contexts
    r, w = group.rank, group.world
    return dataclasses.replace(
        contexts,
        input_ids=contexts.input_ids[r::w],
        attention_mask=contexts.attention_mask[r::w],
        refs=contexts.refs[r::w],
        special=contexts.special[r::w],
    )


class _Restartable:
    """A re-iterable stream: a resumed run restarts it and skips the steps done."""

    def __init__(self, start: Callable[[], Iterable[Tensor]]):
        self.start = start

    def __iter__(self):
        return iter(self.start())


def model_source(
    model: ModelSource | LoadedModel,
    corpus: CorpusConfig,
    spec: SaeSpec,
    layer: int | None = None,
    hookpoint: str | None = None,
    on_model: Callable[[LoadedModel], None] | None = None,
    group: BatchGroup = SINGLE,
) -> TrainSource:
    """A model's activations at one hookpoint (`layer`: resid_post of that block) over the corpus's
    training split; on_model(lm) is called once the model and the corpus are loaded. Under torchrun
    (`group`) each rank forwards its own contexts (rank, rank + W, ...) into batches of batch_size / W."""
    from itda.activations.corpus import load_contexts
    from itda.activations.hookpoints import parse_hookpoint
    from itda.activations.stream import iterate_dense
    from itda.sae.train import rebatch

    corpus.validate()
    if (layer is None) == (hookpoint is None):
        raise FieldError("layer", "a model source needs exactly one of {field} and {hookpoint}", others=("hookpoint",))
    hp = parse_hookpoint(str(layer) if layer is not None else str(hookpoint))
    lm = model if isinstance(model, LoadedModel) else model.load(max_layer=hp.layer if hp.layer >= 0 else None)
    device, init_sample, context = lm.device, spec.init_sample, corpus.context
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
    if on_model is not None:
        on_model(lm)
    part = rank_batch_size(spec.batch_size, group)

    def dense(ctx=contexts):
        return iterate_dense(lm.model, hp, ctx, batch_contexts=per, device=device)

    # the init sample: the first contexts, the same on every rank; training: this rank's contexts
    chunks = itertools.islice(dense(), max(1, init_sample // (per * context)) + 1)
    sample = torch.cat(list(chunks))[:init_sample]
    name = lm.name if isinstance(model, LoadedModel) else model.model
    meta = SaeMeta(model=name, hookpoint=hp.name, tokenizer=lm.tokenizer_name)
    mine = rank_contexts(contexts, group)
    stream = _Restartable(lambda: rebatch(dense(mine), part))
    return TrainSource(stream, sample.cpu(), sample.shape[1], meta, None, str(meta.model))


def train_record(config: TrainConfig, trainer: SaeTrainer, spec: SaeSpec, units: float) -> dict:
    """What the SAE file records of its training (no wall-clock value: resumed runs write the same bytes);
    the learned inference threshold too (in the activations' units) for the architectures with one."""
    sae = trainer.sae
    learned = {"threshold": float(sae.threshold)} if sae.arch.uses_threshold else {}
    return {
        **config.__dict__,
        "lr": trainer.lr,
        "batch_size": spec.batch_size,
        "arch": trainer.sae.cfg.arch,
        "tokens": trainer.tokens_seen,
        "units": units,
        "final_train_fvu": trainer.last_fvu,
        "resampled": trainer.resampled_total,
        **learned,
    }


def _trainer(
    cfg, config, spec: SaeSpec, sample, units, checkpoint, fingerprint, device, group: BatchGroup
) -> tuple[SaeTrainer, dict]:
    """(trainer, init record): resumed from a checkpoint made by this same run, or new with its SAE in `units`
    (under torchrun: rank 0's, on every rank)."""
    from itda.sae.init import new_sae, parse_init

    if checkpoint is not None and checkpoint.exists():
        trainer, extra = SaeTrainer.load_checkpoint(checkpoint, device=device, group=group)
        if (
            trainer.sae.cfg != cfg
            or trainer.config != config
            or extra.get("fingerprint") != fingerprint
            or not isinstance(extra.get("init"), dict)
        ):
            raise FieldError(
                "checkpoint",
                f"{checkpoint}: checkpoint was made with other settings or data; remove it or change {{field}}",
            )
        return trainer, extra["init"]
    init = dict(seed=config.seed, b_dec=spec.b_dec, fill=spec.fill, crop=spec.crop, centre_atoms=spec.centre_atoms)
    sae, info = new_sae(cfg, parse_init(spec.init), sample, device=device, **init)
    sae.scale_biases_(1.0 / units)
    group.broadcast_([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold])
    return SaeTrainer(sae, config, group), info


def _remove_checkpoint(checkpoint: Path | None) -> None:
    """After a finished run: the checkpoint and what writers killed mid-checkpoint left beside it."""
    if checkpoint is not None:
        from itda.atomic import remove_stale_temps

        checkpoint.unlink(missing_ok=True)
        remove_stale_temps(checkpoint)


class Prepared(NamedTuple):
    """A run ready to train: its trainer (new or resumed), init record, checkpoint fingerprint and the
    power-of-two units it trains in (1.0 for ordinary activations)."""

    trainer: SaeTrainer
    info: dict
    fingerprint: dict
    units: float


def prepare_training(
    source: TrainSource, spec: SaeSpec, config: TrainConfig, checkpoint: Path | None, device, group: BatchGroup
) -> Prepared:
    """Check the SAE fits, share rank 0's init sample, and make (or resume) the trainer."""
    from itda.resources import check_fits
    from itda.sae.model import activation_units
    from itda.sae.train import training_bytes

    cfg = spec.sae_config(source.d)
    what = f"training an SAE of {spec.latents} latents x d={source.d} (batch {spec.batch_size})"
    check_fits(training_bytes(cfg, spec.batch_size), what, str(device))
    group.broadcast_([source.sample])  # one init sample (rank 0's) for every rank
    units = activation_units(source.sample)  # 1.0 for ordinary activations; extreme ones train in power-of-two units
    fingerprint = dict(
        source=source.name,
        d=source.d,
        batch_size=spec.batch_size,
        sample_sum=float(source.sample.double().sum()),
        units=units,
        **({"ranks": group.world} if group.distributed else {}),
    )
    trainer, info = _trainer(cfg, config, spec, source.sample, units, checkpoint, fingerprint, str(device), group)
    return Prepared(trainer, info, fingerprint, units)


def finish_training(
    run: Prepared, source: TrainSource, spec: SaeSpec, config: TrainConfig, out, checkpoint: Path | None, group
) -> LoadedSae:
    """Back to the activations' units, the training record, the held-out evaluation; rank 0 writes `out`
    and removes the checkpoint."""
    from itda.sae.io import save_sae

    trainer = run.trainer
    trainer.sae.scale_biases_(run.units)  # from training units back to the activations' own (exact)
    meta = source.meta
    meta.init = run.info
    meta.train = train_record(config, trainer, spec, run.units)
    if not group.is_root:
        return LoadedSae(trainer.sae, meta)
    summary = source.evaluate(trainer.sae) if source.evaluate else None
    if summary:
        meta.train["heldout"] = summary
    if out is not None:
        save_sae(trainer.sae, out, meta)
    _remove_checkpoint(checkpoint)
    return LoadedSae(trainer.sae, meta)


def run_training(
    source: TrainSource,
    spec: SaeSpec,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    on_start: Callable[[SaeTrainer, dict], None] | None = None,
    group: BatchGroup = SINGLE,
) -> LoadedSae:
    """Train an SAE of spec on source to config.steps, resumable from `checkpoint` (removed once the SAE is
    trained and written to `out`, when given); on_start(trainer, init record) is called before the first
    step. meta.train['heldout']: the held-out metrics, when rows were held out. Under torchrun (`group`:
    the source made with it) every rank trains on its shards and ends with the same SAE; rank 0 evaluates,
    writes checkpoints and `out`."""
    from itda.sae.train import ScaledBatches

    checkpoint = Path(checkpoint) if checkpoint is not None else None
    run = prepare_training(source, spec, config, checkpoint, device, group)
    if on_start is not None:
        on_start(run.trainer, run.info)
    # checkpoints carry the run's identity so that a resume with other data is refused
    run.trainer.fit(
        source.stream if run.units == 1.0 else ScaledBatches(source.stream, 1.0 / run.units),
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every if checkpoint else 0,
        checkpoint_extra={"fingerprint": run.fingerprint, "init": run.info},
        progress=progress and group.is_root,
    )
    return finish_training(run, source, spec, config, out, checkpoint, group)
