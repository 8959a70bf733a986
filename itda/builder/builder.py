"""Greedy ITDA dictionary building: stream activations, add those the dictionary explains worst."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from tqdm.auto import tqdm

from itda.builder.candidates import first_unique_rows, greedy_dissimilar
from itda.configfields import FieldError, choice
from itda.dictionary import (
    DEFAULT_K,
    REF_FIELDS,
    Dictionary,
    DictionaryMeta,
    cosine_to_threshold,
    empty_refs,
    threshold_to_cosine,
)
from itda.errors import ItdaInputError
from itda.evaluation.metrics import normalised_loss, recon_terms, unit_rows
from itda.pursuit import GrowingGram, matching_pursuit
from itda.pursuit.api import Backend
from itda.tensorfile import json_entry, read_tensor_file, write_tensor_file

MODES = ("improved", "reference")
# early_stop ends a row's pursuit once its cosine is provably >= the threshold + this: far above
# float32's error in the cosine (~1e-5), so the row is not a candidate, stopped or not
STOP_MARGIN = 1e-3
_CKPT_KEY = "itda_checkpoint"


@dataclass(frozen=True)
class BuildConfig:
    """How to build. Give exactly one of threshold (normalised loss) and min_cosine; `BuildConfig.choose`
    fills in min_cosine = DEFAULT_MIN_COSINE when neither is given."""

    DEFAULT_MIN_COSINE: ClassVar[float] = 0.85

    k: int = choice(DEFAULT_K, "Matching-pursuit steps per activation.")
    threshold: float | None = choice(None, "Add rows whose normalised loss (2-2cos)/d exceeds this.")
    min_cosine: float | None = choice(
        None, f"Add rows reconstructed with cosine below this (default {DEFAULT_MIN_COSINE})."
    )
    mode: str = choice("improved", "improved (default) or reference (the paper's code).")
    max_atoms: int | None = choice(None, "Stop adding atoms at this size.")
    backend: Backend = choice("auto", "Pursuit backend.")
    round_size: int = choice(256, "Improved mode: candidates accepted per round before re-scoring the rest.")
    early_stop: bool = choice(
        True,
        "Improved mode: end a row's pursuit once its cosine provably clears the threshold (the same atoms, "
        "fewer steps); BatchStats.mean_loss then scores such rows by their reconstruction when they stopped.",
    )

    @classmethod
    def choose(cls, threshold: float | None = None, min_cosine: float | None = None, **rest) -> BuildConfig:
        """A config from a user's choice: at most one of threshold and min_cosine (neither: the default cosine)."""
        if threshold is not None and min_cosine is not None:
            raise FieldError("threshold", "give {field} or min_cosine, not both")
        if threshold is None and min_cosine is None:
            min_cosine = cls.DEFAULT_MIN_COSINE
        return cls(threshold=threshold, min_cosine=min_cosine, **rest)

    def validate(self, d: int) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise FieldError("k", f"must be an integer >= 1, got {self.k!r}")
        if (self.threshold is None) == (self.min_cosine is None):
            raise ItdaInputError("give exactly one of threshold and min_cosine")
        if self.threshold is not None and not (0.0 <= self.threshold < 4.0 / d):
            raise FieldError(
                "threshold",
                f"{self.threshold} out of range: the normalised loss (2 - 2cos)/d lies in [0, {4.0 / d:.4g}) for d={d}",
            )
        if self.min_cosine is not None and not (-1.0 < self.min_cosine <= 1.0):
            raise FieldError("min_cosine", f"{self.min_cosine} out of range (-1, 1]")
        if self.mode not in MODES:
            raise FieldError("mode", f"unknown {{field}} {self.mode!r}; choose one of {', '.join(MODES)}")
        if not isinstance(self.early_stop, bool):
            raise FieldError("early_stop", f"must be true or false, got {self.early_stop!r}")
        if self.round_size < 1:
            raise FieldError("round_size", f"must be >= 1, got {self.round_size}")
        if self.max_atoms is not None and self.max_atoms < 1:
            raise FieldError("max_atoms", f"must be >= 1, got {self.max_atoms}")

    def loss_threshold(self, d: int) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.min_cosine is None:
            raise ItdaInputError("give exactly one of threshold and min_cosine")
        return cosine_to_threshold(self.min_cosine, d)

    def cosine_threshold(self, d: int) -> float:
        if self.min_cosine is not None:
            return self.min_cosine
        if self.threshold is None:
            raise ItdaInputError("give exactly one of threshold and min_cosine")
        return threshold_to_cosine(self.threshold, d)


class BatchStats(NamedTuple):
    tokens: int  # rows in the batch
    candidates: int  # rows whose loss exceeded the threshold (or seeding rows)
    added: int  # atoms added from this batch
    size: int  # dictionary size after the batch
    mean_loss: float  # mean normalised loss of the batch against the dictionary before it grew


def _check_batch(acts: torch.Tensor, refs: torch.Tensor | None, d: int) -> torch.Tensor:
    if not isinstance(acts, torch.Tensor) or acts.ndim != 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ItdaInputError(f"activation batch must be a 2-D tensor [tokens, d], got {shape}")
    if acts.shape[1] != d:
        raise ItdaInputError(f"activation batch has d={acts.shape[1]}, the dictionary has d={d}")
    if not acts.is_floating_point():
        raise ItdaInputError(f"activations must be floating point, got {acts.dtype}")
    if not bool(torch.isfinite(acts).all()):
        raise ItdaInputError("activation batch contains NaN or inf")
    if refs is None:
        return empty_refs(acts.shape[0])
    if refs.shape != (acts.shape[0], len(REF_FIELDS)):
        raise ItdaInputError(f"refs must have shape [{acts.shape[0]}, {len(REF_FIELDS)}], got {tuple(refs.shape)}")
    return refs.to(torch.int64).cpu()


class DictionaryBuilder:
    """Incremental ITDA builder (improved mode): call update(batch) per batch, then dictionary().

    `--mode reference` is itda.builder.reference.ReferenceBuilder (the reference trainer's
    procedure); `builder_class(mode)` picks the class.
      improved (default): no seeding; candidates are deduplicated exactly and added in rounds
        of round_size, each round re-scored by MP against the dictionary as it stands; within
        a round a candidate is dropped when an atom accepted earlier in the round is within
        the threshold cosine of it (itda.builder.candidates.greedy_dissimilar).
    """

    def __init__(
        self,
        d: int,
        config: BuildConfig,
        *,
        init: Dictionary | None = None,
        meta: DictionaryMeta | None = None,
        device: torch.device | str = "cpu",
    ):
        config.validate(d)
        self.d = d
        self.config = config
        self.device = torch.device(device)
        self.meta = meta or DictionaryMeta(d=d)
        self.store = GrowingGram(d, self.device)
        self._refs: list[torch.Tensor] = []
        self._appends: list[int] = []  # rows per append, in order: a resume replays them (the same Gram bits)
        self.fingerprint: dict | None = None  # what the stream is (source, d, batch size): checked on resume
        self.batches_seen = 0
        self.tokens_seen = 0
        if init is not None:
            if init.d != d:
                raise ItdaInputError(f"initial dictionary has d={init.d}, activations have d={d}")
            self._append(init.atoms.to(torch.float32), init.refs)

    # -- state -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.store.size

    def _append(self, unit_MD: torch.Tensor, refs_M5: torch.Tensor) -> None:
        self.store.append(unit_MD)
        self._refs.append(refs_M5.cpu())
        if len(unit_MD):
            self._appends.append(int(len(unit_MD)))

    def _restore(self, atoms_ND: torch.Tensor, refs_N5: torch.Tensor, appends: list[int] | None = None) -> None:
        """Set the state from a checkpoint's exact atoms, appended in the original chunks.

        Replaying the chunks gives the Gram matrix the same shapes of products, hence the same
        bits, as the uninterrupted build (without `appends`: one chunk).
        """
        sizes = appends if appends and sum(appends) == len(atoms_ND) else [len(atoms_ND)]
        start = 0
        for n in sizes:
            self._append(atoms_ND[start : start + n], refs_N5[start : start + n])
            start += n

    def refs(self) -> torch.Tensor:
        return torch.cat(self._refs) if self._refs else empty_refs(0)

    # -- one batch -------------------------------------------------------------------------
    def update(
        self,
        acts: torch.Tensor,
        refs: torch.Tensor | None = None,
        *,
        score_chunk: int | Sequence[int] | None = None,
        exchange=None,
    ) -> BatchStats:
        """Score the batch against the dictionary, add its worst-explained rows (improved mode).

        score_chunk: score rows in chunks of this many, or of these sizes in order (so a batch
        made of W rank batches is scored exactly as the W ranks score theirs). exchange: the distributed hook
        (itda.builder.distributed.Exchange) that gathers every rank's candidates in rank order,
        so that all ranks add the same atoms.
        """
        refs = _check_batch(acts, refs, self.d)
        x_BD = acts.to(device=self.device, dtype=torch.float32)
        rows_BD, norms_B = unit_rows(x_BD)  # exact unit rows even near the float32 limit
        nonzero_B = norms_B > 0
        if isinstance(score_chunk, int) or score_chunk is None:
            step = score_chunk or max(1, x_BD.shape[0])
            sizes = [min(step, x_BD.shape[0] - s) for s in range(0, x_BD.shape[0], step)]
        else:
            sizes = [int(n) for n in score_chunk if n]
            if sum(sizes) != x_BD.shape[0]:
                raise ItdaInputError(f"score_chunk sizes add up to {sum(sizes)}, the batch has {x_BD.shape[0]} rows")
        loss_B = torch.cat([self._loss(part) for part in torch.split(x_BD, sizes)]) if len(x_BD) else norms_B
        over_B = (loss_B > self.config.loss_threshold(self.d)) & nonzero_B
        cand = torch.nonzero(over_B).squeeze(1)
        unit_MD, cand_refs = rows_BD[cand], refs[cand.cpu()]
        tokens, loss_sum = x_BD.shape[0], float(loss_B.double().sum())
        if exchange is not None:
            unit_MD, cand_refs, tokens, loss_sum = exchange.gather(unit_MD, cand_refs, tokens, loss_sum)
        added = self._add_in_rounds(unit_MD, cand_refs, self._room())
        return self._finish(tokens, len(unit_MD), added, loss_sum / max(tokens, 1))

    def _add_in_rounds(self, unit_MD: torch.Tensor, refs_M5: torch.Tensor, room: int) -> int:
        """Improved mode: add candidates round by round, in batch order.

        Each round takes the next `round_size` candidates, re-scores them by MP against the
        dictionary as it stands (so atoms added by earlier rounds of this batch count), drops
        exact duplicates and those within the threshold cosine of one accepted earlier in the
        round, and adds the rest. Every candidate is scored at most once more than the batch.
        """
        keep = first_unique_rows(unit_MD)
        cand, unit_MD = torch.nonzero(keep).squeeze(1), unit_MD[keep]
        cos_thr = self.config.cosine_threshold(self.d)
        loss_thr = self.config.loss_threshold(self.d)
        added = 0
        r = self.config.round_size
        for start in range(0, len(cand), r):
            if added >= room:
                break
            head_c, head_u = cand[start : start + r], unit_MD[start : start + r]
            if added:
                still = self._loss(head_u) > loss_thr
                head_c, head_u = head_c[still], head_u[still]
            ok = greedy_dissimilar(head_u, torch.ones(len(head_c), dtype=torch.bool, device=head_u.device), cos_thr)
            take_c, take_u = head_c[ok][: room - added], head_u[ok][: room - added]
            self._append(take_u, refs_M5[take_c.cpu()])
            added += len(take_c)
        return added

    def _room(self) -> int:
        return self.config.max_atoms - self.size if self.config.max_atoms is not None else 1 << 62

    def _loss(self, x_BD: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return normalised_loss(torch.zeros(x_BD.shape[0], device=x_BD.device), self.d)
        # batches were validated in update(): no second NaN/inf scan here
        codes = matching_pursuit(
            x_BD,
            self.store.atoms,
            self.config.k,
            gram=self.store.gram,
            backend=self.config.backend,
            check_finite=False,
            stop_cosine=self.config.cosine_threshold(self.d) + STOP_MARGIN if self.config.early_stop else None,
        )
        return normalised_loss(recon_terms(x_BD, codes, self.store.atoms).cosine, self.d)

    def _finish(self, tokens: int, candidates: int, added: int, mean_loss: float) -> BatchStats:
        self.batches_seen += 1
        self.tokens_seen += tokens
        return BatchStats(tokens, candidates, added, self.size, mean_loss)

    # -- results ---------------------------------------------------------------------------
    def dictionary(self, dtype: torch.dtype = torch.float32) -> Dictionary:
        meta = DictionaryMeta(**{**asdict(self.meta), "d": self.d})
        meta.k = self.config.k
        meta.threshold = self.config.loss_threshold(self.d)
        meta.min_cosine = self.config.cosine_threshold(self.d)
        meta.build = {
            **meta.build,
            "mode": self.config.mode,
            "max_atoms": self.config.max_atoms,
            "batches": self.batches_seen,
            "tokens": self.tokens_seen,
        }
        atoms = self.store.atoms.to(dtype).cpu().clone()
        return Dictionary(atoms, self.refs().clone(), meta)

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The full state: tensors (exact float32 atoms, refs, append sizes) and JSON (settings, counters).

        A snapshot: later updates append past it and replace, never modify, what it holds.
        """
        self._refs = [self.refs()]
        tensors = {
            "atoms": self.store.atoms,
            "refs": self._refs[0],
            "appends": torch.tensor(self._appends, dtype=torch.int64),
        }
        entry = {
            "fingerprint": self.fingerprint,
            "config": asdict(self.config),
            "meta": json.loads(self.meta.to_json()),
            "d": self.d,
            "batches_seen": self.batches_seen,
            "tokens_seen": self.tokens_seen,
        }
        return tensors, entry

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, torch.Tensor],
        entry: dict,
        source: str | os.PathLike,
        device: torch.device | str = "cpu",
    ) -> DictionaryBuilder:
        """The builder a state() describes (its mode's class); a malformed state raises ItdaInputError naming source."""
        try:
            meta = DictionaryMeta.from_json(json.dumps(entry["meta"]), str(source))
            config = BuildConfig(**entry["config"])
            builder = builder_class(config.mode)(int(entry["d"]), config, meta=meta, device=device)
            appends = tensors["appends"].tolist() if "appends" in tensors else None
            builder._restore(tensors["atoms"].to(torch.float32), tensors["refs"].to(torch.int64), appends)
            builder.batches_seen = int(entry["batches_seen"])
            builder.tokens_seen = int(entry["tokens_seen"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ItdaInputError(f"{source}: not a readable itda checkpoint ({type(exc).__name__}: {exc})") from None
        builder.fingerprint = entry.get("fingerprint")
        return builder

    def save_checkpoint(self, path: str | os.PathLike, state: tuple[dict, dict] | None = None) -> None:
        """Atomically write the full builder state (or a `state()` snapshot taken earlier)."""
        tensors, entry = state if state is not None else self.state()
        write_tensor_file(path, tensors, _CKPT_KEY, entry)

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> DictionaryBuilder:
        header, tensors = read_tensor_file(path, "itda checkpoint")
        return cls.from_state(tensors, json_entry(header, _CKPT_KEY, path, "itda checkpoint"), path, device)


_BUILDER_CLASSES: dict[str, type[DictionaryBuilder]] = {"improved": DictionaryBuilder}  # mode -> class


def register_mode(mode: str, cls: type[DictionaryBuilder]) -> None:
    """Make `cls` the builder of `mode` (itda.builder.reference registers the reference mode on import,
    which importing any itda.builder module does: the package imports it)."""
    _BUILDER_CLASSES[mode] = cls


def builder_class(mode: str) -> type[DictionaryBuilder]:
    """DictionaryBuilder for the improved mode, ReferenceBuilder for the reference mode."""
    if mode == "reference" and mode not in _BUILDER_CLASSES:
        raise ItdaInputError("the reference mode is not registered: import itda.builder")
    return _BUILDER_CLASSES.get(mode, DictionaryBuilder)


Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


def _split(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, tuple):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _resumed(
    checkpoint: str | os.PathLike, config: BuildConfig, d: int, fingerprint: dict | None, device
) -> DictionaryBuilder:
    """The builder of an existing checkpoint, refused when made with other settings, width or stream."""
    builder = DictionaryBuilder.load_checkpoint(checkpoint, device=device)
    if builder.config != config:
        raise ItdaInputError(f"{checkpoint}: checkpoint was made with different build settings {builder.config}")
    if builder.d != d:
        raise ItdaInputError(f"{checkpoint}: checkpoint has d={builder.d}, the activations d={d}")
    recorded = builder.fingerprint or {}
    if fingerprint is not None and recorded != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(recorded) if recorded.get(k) != fingerprint.get(k))
        raise ItdaInputError(
            f"{checkpoint}: checkpoint was made from another stream (differs in {', '.join(diff)}); "
            "remove it or use the original input and options"
        )
    return builder


def build_dictionary(
    batches: Iterable[Batch],
    *,
    k: int = BuildConfig.k,
    threshold: float | None = None,
    min_cosine: float | None = None,
    mode: str = BuildConfig.mode,
    init: Dictionary | None = None,
    max_atoms: int | None = None,
    backend: Backend = BuildConfig.backend,
    meta: DictionaryMeta | None = None,
    device: torch.device | str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
    total_tokens: int | None = None,
    fingerprint: dict | None = None,
    score_chunk: int | None = None,
    exchange=None,
) -> Dictionary:
    """Build a dictionary from an iterator of activation batches ([B, d] or ([B, d], refs [B, 5])).

    With `checkpoint`, the state is written atomically every `checkpoint_every` batches and an
    existing checkpoint is resumed: its batches are skipped from the (identical) stream, and
    the result is byte-identical to an uninterrupted build. `fingerprint` (e.g. source hash, d,
    batch size) is stored in the checkpoint and a resume with another one is refused. On Ctrl-C
    the state is checkpointed before the interrupt propagates.
    """
    config = BuildConfig(
        k=k, threshold=threshold, min_cosine=min_cosine, mode=mode, max_atoms=max_atoms, backend=backend
    )
    iterator: Iterator[Batch] = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ItdaInputError("the activation stream was empty")
    acts0 = _split(first)[0]
    if not isinstance(acts0, torch.Tensor) or acts0.ndim != 2:
        _check_batch(acts0, None, 0)  # raises, naming the shape
    d = acts0.shape[1]
    config.validate(d)
    if checkpoint is not None and Path(checkpoint).exists():
        builder = _resumed(checkpoint, config, d, fingerprint, device)
    else:
        builder = builder_class(mode)(d, config, init=init, meta=meta, device=device)
        builder.fingerprint = fingerprint
    writer = exchange is None or exchange.rank == 0  # one rank writes checkpoints and shows progress
    save_to = checkpoint if writer else None
    # the state after the last whole batch (what Ctrl-C saves)
    snapshot = builder.state() if save_to is not None else None
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not (progress and writer), desc="build")
    try:
        for index, batch in enumerate(itertools.chain([first], iterator)):
            acts, refs = _split(batch)
            if index < builder.batches_seen:
                bar.update(acts.shape[0])
                continue
            stats = builder.update(acts, refs, score_chunk=score_chunk, exchange=exchange)
            snapshot = builder.state() if save_to is not None else None
            bar.update(stats.tokens)
            bar.set_postfix(atoms=stats.size, refresh=False)
            if save_to is not None and checkpoint_every and builder.batches_seen % checkpoint_every == 0:
                builder.save_checkpoint(save_to, snapshot)
    except KeyboardInterrupt:
        if save_to is not None:
            builder.save_checkpoint(save_to, snapshot)
        raise
    finally:
        bar.close()
    return builder.dictionary()
