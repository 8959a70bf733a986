"""Several hookpoints' SAEs trained from one forward pass per batch (`itda sae train MODEL --layers 4,8`).

Every batch of contexts is forwarded once and each hookpoint's rows feed its own trainer, all in
lockstep. Under torchrun the ranks either train every SAE data-parallel (each rank its contexts, the
gradients summed, as one hookpoint trains) or, with `distribute`, share the hookpoints out (hookpoint
i to rank i mod W, as sparsify's --distribute_modules): each rank still forwards its own contexts,
the step's rows of every hookpoint are gathered, and each rank trains its hookpoints alone on the
whole step's batch. Both modes see the same global batches (the ranks' shards in rank order), so
they train the same SAEs. Each SAE is written by the rank that trains it, as OUT/<hookpoint>.safetensors;
checkpoints are one file per hookpoint in the checkpoint folder, resumed from the earliest step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from itda.activations.config import CorpusConfig
from itda.activations.hookpoints import Hookpoint, parse_hookpoint
from itda.activations.models import LoadedModel
from itda.configfields import FieldError
from itda.errors import ItdaInputError
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.io import LoadedSae, SaeMeta
from itda.sae.run import Prepared, TrainSource, finish_training, prepare_training, rank_batch_size, rank_contexts
from itda.sae.train import SaeSpec, TrainConfig, rebatch


def parse_hookpoints(layers) -> list[Hookpoint]:
    """Hookpoints from a comma list (or list) of block indices (resid_post) or hookpoint names, each once."""
    names = [str(p).strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if str(p).strip()]
    if len(names) < 2:
        raise FieldError("layers", f"names at least two hookpoints, got {names!r} (one: use --layer)")
    hps = [parse_hookpoint(n) for n in names]
    if len({hp.name for hp in hps}) != len(hps):
        raise FieldError("layers", f"names a hookpoint twice: {', '.join(names)}")
    return hps


def owners(n_hookpoints: int, group: BatchGroup, distribute: bool) -> list[int]:
    """The rank that trains each hookpoint's SAE (-1: every rank, data-parallel)."""
    if not distribute:
        return [-1] * n_hookpoints
    if not group.distributed:
        raise FieldError("distribute_hookpoints", "needs torchrun with 2 or more ranks")
    if n_hookpoints < group.world:
        raise FieldError("distribute_hookpoints", f"needs a hookpoint per rank ({group.world}), got {n_hookpoints}")
    return [i % group.world for i in range(n_hookpoints)]


def step_rows(lm: LoadedModel, hps: list[Hookpoint], contexts, per: int, rows: int) -> Iterator[list[Tensor]]:
    """[rows, d] float32 activations of every hookpoint per batch, one forward pass per `per` contexts."""
    from itda.activations.stream import iterate_batches

    widths: list[int] = []

    def joined():  # the hookpoints side by side: one rebatch keeps their rows aligned
        for b in iterate_batches(lm.model, hps, contexts, batch_contexts=per, dtype=torch.float32, device=lm.device):
            parts = [b[hp].dense() for hp in hps]
            widths[:] = [p.shape[1] for p in parts]
            yield torch.cat(parts, 1)

    for x in rebatch(joined(), rows):
        yield list(x.split(widths, 1))


def _gathered(stream: Iterator[list[Tensor]], group: BatchGroup) -> Iterator[list[Tensor]]:
    """Every rank's rows of every hookpoint, concatenated in rank order (one all-gather per step)."""
    for xs in stream:
        widths = [x.shape[1] for x in xs]
        yield list(group.gather_rows(torch.cat(xs, 1)).split(widths, 1))


def train_hookpoints(
    lm: LoadedModel,
    name: str,
    corpus: CorpusConfig,
    spec: SaeSpec,
    config: TrainConfig,
    hps: list[Hookpoint],
    *,
    out: Path | None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 100,
    distribute: bool = False,
    group: BatchGroup = SINGLE,
    progress: bool = True,
) -> dict[str, LoadedSae]:
    """This rank's SAEs (every hookpoint's, or with `distribute` those it owns) by hookpoint name."""
    from itda.activations.corpus import load_contexts

    own = owners(len(hps), group, distribute)
    part = rank_batch_size(spec.batch_size, group)
    _docs, contexts = load_contexts(
        corpus.source,
        lm.tokenizer,
        tokenizer_name=lm.tokenizer_name,
        split="train",
        tokens=corpus.tokens + spec.init_sample,
        context=corpus.context,
        field=corpus.field,
    )
    per = corpus.batch_contexts
    # the init samples: the first contexts' rows, the same on every rank
    samples = next(step_rows(lm, hps, contexts, per, spec.init_sample), None)
    if samples is None:
        raise FieldError(
            "init_sample", f"is more than the {int(contexts.attention_mask.sum())} tokens the corpus gives"
        )
    mine = [i for i, r in enumerate(own) if r in (-1, group.rank)]
    trainer_group = SINGLE if distribute else group
    runs: dict[int, tuple[TrainSource, Prepared, Path | None]] = {}
    for i in mine:
        meta = SaeMeta(model=name, hookpoint=hps[i].name, tokenizer=lm.tokenizer_name)
        source = TrainSource((), samples[i].cpu(), samples[i].shape[1], meta, None, f"{name}:{hps[i].name}")
        path = None if checkpoint is None else checkpoint / f"{hps[i].name}.safetensors"
        runs[i] = (source, prepare_training(source, spec, config, path, lm.device, trainer_group), path)
    stream = step_rows(lm, hps, rank_contexts(contexts, group), per, part)
    _lockstep(_gathered(stream, group) if distribute else stream, runs, config, checkpoint_every, group, progress)
    return {
        hps[i].name: finish_training(
            run, source, spec, config, None if out is None else out / f"{hps[i].name}.safetensors", path, trainer_group
        )
        for i, (source, run, path) in runs.items()
    }


def _lockstep(stream, runs: dict, config: TrainConfig, checkpoint_every: int, group: BatchGroup, progress: bool):
    """Step every run on its hookpoint's rows of each batch, from the earliest step any run is at (a run
    ahead, resumed from a later checkpoint, waits for the stream to reach it)."""
    steps = [run.trainer.step_count for _, run, _ in runs.values()]
    low = group.min_value(float(min(steps)) if steps else None)  # every rank skips as far as all can
    start = int(low) if low is not None else 0
    bar = tqdm(total=config.steps, initial=start, unit="step", disable=not progress or not group.is_root, desc="saes")
    try:
        for index, xs in enumerate(itertools.islice(stream, start, config.steps), start):
            for i, (_, run, path) in runs.items():
                if run.trainer.step_count != index:
                    continue
                run.trainer.step(xs[i] if run.units == 1.0 else xs[i] * (1.0 / run.units))
                if checkpoint_every and run.trainer.step_count % checkpoint_every == 0:
                    _save(run, path)
            bar.update(1)
    except KeyboardInterrupt:  # as one hookpoint's run does: every SAE's state, then stop
        for _, run, path in runs.values():
            _save(run, path)
        raise
    finally:
        bar.close()
    for _, run, _ in runs.values():
        if run.trainer.step_count < config.steps:
            raise ItdaInputError(f"the activation stream ended after {run.trainer.step_count} of {config.steps} steps")


def _save(run: Prepared, path: Path | None) -> None:
    """The run's checkpoint (its identity carried, so a resume with other data is refused)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        run.trainer.save_checkpoint(path, {"fingerprint": run.fingerprint, "init": run.info})
