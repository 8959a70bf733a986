"""Build dictionaries from a model end to end: corpus -> forward passes -> one builder per hookpoint.

The contexts are forwarded `batch_contexts` at a time, in corpus order. A step takes W
consecutive batches: one (W = 1), rank r's batch of each W under torchrun (`exchange`), or all
W in one process (`interleave=W`), scored batch by batch with the candidates added in batch
order, so the last two give the same dictionaries. With `checkpoint`, the corpus position and
every builder's full state are saved in one file every `checkpoint_every` steps and on Ctrl-C;
an existing checkpoint is resumed by skipping its steps' contexts (the packing is deterministic,
so they are not forwarded again), and the dictionaries are byte-identical to an uninterrupted
build's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from itda.activations.config import CorpusConfig
from itda.activations.corpus import Contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import LoadedModel
from itda.activations.stream import FP16_MAX, ActBatch, check_contexts_fit, iterate_batches
from itda.builder import BuildConfig, DictionaryBuilder, builder_class
from itda.dictionary import REF_FIELDS, Dictionary, DictionaryMeta
from itda.errors import ItdaInputError
from itda.tensorfile import json_entry, read_tensor_file, write_tensor_file

_CKPT_KEY = "itda_model_checkpoint"
_WHAT = "itda model-build checkpoint"


@dataclass
class ModelBuildResult:
    dictionaries: dict[Hookpoint, Dictionary]
    tokens: int  # activations streamed per hookpoint by this run (all ranks)
    seconds: float
    forward_seconds: float  # time inside the model's forward passes
    max_abs: dict[Hookpoint, float]  # largest activation component seen per hookpoint

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


@dataclass
class _Stream:
    """The corpus as forward batches of `batch_contexts` contexts."""

    lm: LoadedModel
    hookpoints: list[Hookpoint]
    contexts: Contexts
    batch_contexts: int
    dtype: torch.dtype
    include_special: bool
    device: str | torch.device

    @property
    def n_batches(self) -> int:
        return -(-len(self.contexts) // self.batch_contexts)

    def forward(self, start: int, stop: int) -> dict[Hookpoint, ActBatch]:
        """{hookpoint: ActBatch} of contexts start..stop (one forward pass)."""
        rows = self.contexts.rows(start, stop)
        return next(
            iterate_batches(
                self.lm.model,
                self.hookpoints,
                rows,
                batch_contexts=max(1, stop - start),
                dtype=self.dtype,
                include_special=self.include_special,
                device=self.device,
            )
        )

    def batch(self, b: int) -> dict[Hookpoint, ActBatch]:
        return self.forward(b * self.batch_contexts, (b + 1) * self.batch_contexts)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def stream_fingerprint(
    lm: LoadedModel,
    hookpoints: list[Hookpoint],
    contexts: Contexts,
    config: BuildConfig,
    *,
    corpus_name: str,
    batch_contexts: int,
    dtype: torch.dtype,
    include_special: bool,
    world: int,
) -> dict:
    """What a model build's checkpoint records and a resume must match (model, hookpoints, corpus, options).

    `layerwise` is there because layer-wise and in-memory forwards differ in the last bits (and
    the automatic choice depends on the free memory).
    """
    return {
        "model": lm.name,
        "tokenizer": lm.tokenizer_name,
        "layerwise": lm.layerwise is not None,
        "hookpoints": [hp.name for hp in hookpoints],
        "corpus": corpus_name,
        "corpus_fingerprint": contexts.fingerprint,
        "documents_fingerprint": contexts.documents_fingerprint,
        "contexts": len(contexts),
        "context": int(contexts.input_ids.shape[1]),
        "batch_contexts": batch_contexts,
        "stream_dtype": _dtype_name(dtype),
        "include_special": include_special,
        "world_size": world,
        **asdict(config),
    }


# -- checkpoints -------------------------------------------------------------------------------
def _snapshot(builders: dict, hookpoints: list[Hookpoint], steps: int, max_abs: dict, fingerprint: dict):
    """(tensors, entry): the build after `steps` whole steps (position, each builder's state, largest |x|)."""
    tensors, states = {}, []
    for i, hp in enumerate(hookpoints):
        if hp not in builders:
            states.append(None)
            continue
        t, entry = builders[hp].state()
        tensors.update({f"{i}.{name}": v for name, v in t.items()})
        states.append(entry)
    entry = {
        "fingerprint": fingerprint,
        "steps": steps,
        "max_abs": [max_abs[hp] for hp in hookpoints],
        "builders": states,
    }
    return tensors, entry


def save_model_checkpoint(path: str | os.PathLike, snapshot: tuple[dict, dict]) -> None:
    """Write a snapshot atomically, as one file."""
    tensors, entry = snapshot
    write_tensor_file(path, tensors, _CKPT_KEY, entry)


def _differences(recorded: dict, fingerprint: dict) -> list[str]:
    return sorted(k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k))


def load_model_checkpoint(
    path: str | os.PathLike, fingerprint: dict, hookpoints: list[Hookpoint], device: str | torch.device = "cpu"
) -> tuple[int, dict, dict]:
    """(steps done, builders, largest |x| per hookpoint); a checkpoint of another build is refused, naming what
    differs."""
    header, tensors = read_tensor_file(path, _WHAT)
    if _CKPT_KEY not in header:
        raise ItdaInputError(
            f"{path}: not an {_WHAT} (another command's file?); remove it or choose another --checkpoint"
        )
    entry = json_entry(header, _CKPT_KEY, path, _WHAT)
    diff = _differences(entry.get("fingerprint") or {}, fingerprint)
    if diff:
        raise ItdaInputError(
            f"{path}: checkpoint was made with another build (differs in {', '.join(diff)}); "
            "remove it or use the original model, corpus and options"
        )
    try:
        builders = {}
        for i, (hp, state) in enumerate(zip(hookpoints, entry["builders"], strict=True)):
            if state is not None:
                own = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.split(".", 1)[0] == str(i)}
                builders[hp] = DictionaryBuilder.from_state(own, state, path, device)
        max_abs = {hp: float(m) for hp, m in zip(hookpoints, entry["max_abs"], strict=True)}
        return int(entry["steps"]), builders, max_abs
    except (KeyError, TypeError, ValueError) as exc:
        raise ItdaInputError(f"{path}: not a readable {_WHAT} ({type(exc).__name__}: {exc})") from None


def _resume(checkpoint, fingerprint: dict, hookpoints: list[Hookpoint], device, exchange) -> tuple[int, dict, dict]:
    """(steps done, builders, largest |x|): from an existing checkpoint, else a fresh start; all ranks must agree."""
    steps, builders, max_abs = 0, {}, {hp: 0.0 for hp in hookpoints}
    if checkpoint is not None and Path(checkpoint).exists():
        steps, builders, max_abs = load_model_checkpoint(checkpoint, fingerprint, hookpoints, device)
    if exchange is not None:
        found = exchange.gather_rows(torch.tensor([[steps]], dtype=torch.int64)).view(-1).tolist()
        if len(set(found)) > 1:
            raise ItdaInputError(
                f"{checkpoint}: the ranks resume from different steps {found}; "
                "every rank must see the same checkpoint file"
            )
    return steps, builders, max_abs


# -- one step ----------------------------------------------------------------------------------
def _empty_batch(stream: _Stream, builders: dict) -> dict[Hookpoint, ActBatch]:
    """A zero-row batch per hookpoint (a rank whose share of the last step is empty)."""
    if len(builders) == len(stream.hookpoints):
        return {
            hp: ActBatch(
                torch.zeros(0, builders[hp].d, dtype=stream.dtype),
                torch.zeros(0),
                torch.zeros(0, len(REF_FIELDS), dtype=torch.int64),
                0.0,
            )
            for hp in stream.hookpoints
        }
    return {hp: ActBatch(a.unit[:0], a.norm[:0], a.refs[:0], 0.0) for hp, a in stream.forward(0, 1).items()}


def _step_batches(stream: _Stream, step: int, world: int, rank: int | None, builders: dict) -> list[dict]:
    """The forward batches of a step this process scores: all W of them (rank None) or its rank's own."""
    first = step * world
    if rank is None:
        return [stream.batch(b) for b in range(first, min(first + world, stream.n_batches))]
    return [stream.batch(first + rank) if first + rank < stream.n_batches else _empty_batch(stream, builders)]


def _update(builders: dict, batches: list[dict], stream: _Stream, config: BuildConfig, new_meta, exchange) -> int:
    """Feed a step's batches to every hookpoint's builder (made at the first step); the step's tokens (all ranks)."""
    tokens = 0
    for hp in stream.hookpoints:
        parts = [b[hp] for b in batches]
        unit, refs = torch.cat([p.unit for p in parts]), torch.cat([p.refs for p in parts])
        if hp not in builders:
            d = unit.shape[1]
            builders[hp] = builder_class(config.mode)(d, config, meta=new_meta(hp, d), device=stream.device)
        stats = builders[hp].update(unit, refs, score_chunk=[len(p.unit) for p in parts], exchange=exchange)
        tokens = stats.tokens  # every hookpoint sees the same tokens
    return tokens


def _track_max(max_abs: dict, batches: list[dict], hookpoints: list[Hookpoint], exchange) -> None:
    """Raise max_abs to the step's largest |x| per hookpoint (over all ranks)."""
    step = torch.tensor([[max(b[hp].max_abs for b in batches) for hp in hookpoints]], dtype=torch.float64)
    if exchange is not None:
        step = exchange.gather_rows(step)
    for i, hp in enumerate(hookpoints):
        max_abs[hp] = max(max_abs[hp], float(step[:, i].max()))


def _meta_maker(lm: LoadedModel, contexts: Contexts, corpus_name: str, dtype, include_special: bool, world: int):
    def new_meta(hp: Hookpoint, d: int) -> DictionaryMeta:
        build = {
            "corpus": corpus_name,
            "documents_fingerprint": contexts.documents_fingerprint,
            "stream_dtype": _dtype_name(dtype),
            "include_special": include_special,
        }
        if world > 1:
            build["world_size"] = world
        if lm.revision is not None:
            build["model_revision"] = lm.revision  # the hub commit: eval and explore reload this one
        return DictionaryMeta(
            d=d,
            model=lm.name,
            hookpoint=hp.name,
            layer=hp.layer,
            tokenizer=lm.tokenizer_name,
            dataset_fingerprint=contexts.fingerprint,
            build=build,
        )

    return new_meta


# -- the build ---------------------------------------------------------------------------------
def build_from_model(
    lm: LoadedModel,
    hookpoints: list[Hookpoint],
    contexts: Contexts,
    config: BuildConfig,
    *,
    corpus_name: str = "",
    batch_contexts: int = 32,
    dtype: torch.dtype = torch.float16,
    include_special: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    fingerprint: dict | None = None,
    exchange=None,
    interleave: int = 1,
    on_start: Callable[[], None] | None = None,
) -> ModelBuildResult:
    """Stream the contexts through the model once, feeding every hookpoint's builder.

    device: where the builders run (default: the model's). checkpoint: resumed when it exists
    (refused when made with another build; `fingerprint` adds fields it must match, e.g. the CLI's
    --tokens), saved every `checkpoint_every` steps and on Ctrl-C, by rank 0. exchange: torchrun's
    (itda.builder.distributed.init_distributed). on_start: called once the inputs are checked, before
    the first forward pass (the CLI prints its run header there).
    """
    t0 = time.perf_counter()
    device = lm.device if device is None else device
    check_contexts_fit(lm.model, contexts)  # refused before any work, not at the batch that does not fit
    hps = list(hookpoints)
    world, rank = (exchange.world, exchange.rank) if exchange is not None else (max(1, interleave), None)
    stream = _Stream(lm, hps, contexts, batch_contexts, dtype, include_special, device)
    fp = {
        **stream_fingerprint(
            lm,
            hps,
            contexts,
            config,
            corpus_name=corpus_name,
            batch_contexts=batch_contexts,
            dtype=dtype,
            include_special=include_special,
            world=world,
        ),
        **(fingerprint or {}),
    }
    done, builders, max_abs = _resume(checkpoint, fp, hps, device, exchange)
    new_meta = _meta_maker(lm, contexts, corpus_name, dtype, include_special, world)
    save_to = checkpoint if exchange is None or exchange.rank == 0 else None  # rank 0 writes the checkpoints
    snapshot = _snapshot(builders, hps, done, max_abs, fp) if save_to is not None else None
    if on_start is not None:
        on_start()
    bar = _progress_bar(lm.name, contexts, include_special, builders, progress and rank in (None, 0))
    tokens, forward_s = 0, 0.0
    try:
        for step in range(done, -(-stream.n_batches // world)):
            tf = time.perf_counter()
            batches = _step_batches(stream, step, world, rank, builders)
            forward_s += time.perf_counter() - tf
            n = _update(builders, batches, stream, config, new_meta, exchange)
            _track_max(max_abs, batches, hps, exchange)
            if save_to is not None:
                snapshot = _snapshot(builders, hps, step + 1, max_abs, fp)
                if checkpoint_every and (step + 1) % checkpoint_every == 0:
                    save_model_checkpoint(save_to, snapshot)
            tokens += n
            bar.update(n)
            sizes = {hp.name: b.size for hp, b in builders.items()}
            bar.set_postfix(sizes if len(sizes) <= 3 else {"atoms": sum(sizes.values())}, refresh=False)
    except KeyboardInterrupt:
        if save_to is not None:
            assert snapshot is not None  # taken whenever there is a checkpoint to write
            save_model_checkpoint(save_to, snapshot)
        raise
    finally:
        bar.close()
    _fp16_notes(max_abs, dtype, progress and rank in (None, 0))
    dictionaries = {hp: builders[hp].dictionary() for hp in hps if hp in builders}
    return ModelBuildResult(dictionaries, tokens, time.perf_counter() - t0, forward_s, max_abs)


def build_on_corpus(
    lm: LoadedModel,
    hookpoints: list[Hookpoint],
    corpus: CorpusConfig,
    config: BuildConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    fingerprint: dict | None = None,
    exchange=None,
    on_start: Callable[[], None] | None = None,
) -> ModelBuildResult:
    """build_from_model over the training split of `corpus` (what `itda build MODEL` and itda.build run).

    The dictionaries record the corpus; a checkpoint also records corpus.tokens (a resume with
    another --tokens is refused).
    """
    from itda.activations.corpus import load_contexts
    from itda.activations.stream import STREAM_DTYPES

    corpus.validate()
    _docs, contexts = load_contexts(
        corpus.source,
        lm.tokenizer,
        tokenizer_name=lm.tokenizer_name,
        split="train",
        tokens=corpus.tokens,
        context=corpus.context,
        field=corpus.field,
    )
    return build_from_model(
        lm,
        hookpoints,
        contexts,
        config,
        corpus_name=corpus.source,
        batch_contexts=corpus.batch_contexts,
        dtype=STREAM_DTYPES[corpus.stream_dtype],
        include_special=corpus.include_special,
        device=device,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every if checkpoint else 0,
        fingerprint={"tokens": corpus.tokens, **(fingerprint or {})},
        exchange=exchange,
        on_start=on_start,
    )


def _progress_bar(name: str, contexts: Contexts, include_special: bool, builders: dict, show: bool):
    """A tokens bar over the corpus, starting where resumed builders left off."""
    real = int(contexts.attention_mask.sum()) if include_special else int((~contexts.special).sum())
    seen = next(iter(builders.values())).tokens_seen if builders else 0
    return tqdm(total=real, initial=seen, unit="tok", unit_scale=True, disable=not show, desc=f"build {name}")


def _fp16_notes(max_abs: dict, dtype: torch.dtype, show: bool) -> None:
    for hp, m in max_abs.items():
        if m > FP16_MAX and dtype == torch.float16 and show:
            tqdm.write(
                f"note: {hp.name} reaches |x| = {m:,.0f}, beyond fp16; "
                "streamed as fp16 unit directions + fp32 norms, nothing lost"
            )


def save_dictionaries(result: ModelBuildResult, out_dir: Path) -> list[Path]:
    paths = []
    for hp, d in result.dictionaries.items():
        p = out_dir / f"{hp.file_stem}.safetensors"
        d.save(p)
        paths.append(p)
    return paths
