"""The two passes of a model comparison over the paired corpus, feeding the plan's accumulators.

Pass 1 forwards every chunk once (every layer of both models) and feeds the CKA grid (all layer
pairs), the first max_rows paired rows (kept-rows measures), one ITDA dictionary per layer
(Jaccard) and, for the per-token ITDA measures, one dictionary per layer over rows centred by the
first chunk's mean. Pass 2 (per-token measures only) forwards again and encodes every paired
token over those centred dictionaries (`itda.comparison.per_token.PerTokenGrid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from itda.activations.stream import STREAM_DTYPES
from itda.builder import BuildConfig, DictionaryBuilder
from itda.comparison.cka_grids import CKAGrid, make_grid
from itda.comparison.itda_measures import itda_grids
from itda.comparison.measures import similarity_grid
from itda.comparison.pairing import PairedCorpus, forward_chunk, pair_rows
from itda.comparison.per_token import CentredDictionaries, PerTokenGrid
from itda.comparison.plan import PASS2_ROWS, ROW_SLICE, CompareConfig, ComparePlan
from itda.comparison.ranks import Ranks
from itda.comparison.streaming import StreamingCKAGrid
from itda.dictionary import DictionaryMeta
from itda.pursuit.gram import GramPool
from itda.resources import trim_heap


class DenseLayers(Sequence[torch.Tensor]):
    """Per layer, dense float32 rows made when read (`unit * norm`, the bits of `ActBatch.dense()`)
    from unit rows kept in the stream dtype: half the bytes of dense float32 rows at float16."""

    def __init__(self, units: list[torch.Tensor], norms: list[torch.Tensor]):
        self.units, self.norms = units, norms

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, layer):  # type: ignore[override]  # layers are read one at a time
        return self.units[layer].to(torch.float32) * self.norms[layer][:, None]


class KeptRows:
    """The first max_rows paired rows of every layer of both models (unit rows in the stream dtype
    and their norms), with each row's chunk index."""

    def __init__(self, layers_a: int, layers_b: int, max_rows: int, self_compare: bool = False):
        # per layer, lists of (unit rows, norms) pieces; B's are A's in a self-comparison (one copy)
        self.a: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(layers_a)]
        self.b: list[list[tuple[torch.Tensor, torch.Tensor]]] = (
            self.a if self_compare else [[] for _ in range(layers_b)]
        )
        self.chunk: list[torch.Tensor] = []  # chunk index of every kept row (ranks gather them in chunk order)
        self.n, self.max_rows = 0, max_rows

    @property
    def full(self) -> bool:
        return self.n >= self.max_rows

    def add(self, chunk_index: int, batch_a: list, rows_a: torch.Tensor, batch_b: list, rows_b: torch.Tensor) -> None:
        """Keep these paired rows (indices into the chunk's batches of A and B), up to max_rows."""
        take = min(self.max_rows - self.n, len(rows_a))
        for store, batch, rows in self._stores((batch_a, rows_a[:take]), (batch_b, rows_b[:take])):
            for pieces, acts in zip(store, batch, strict=True):
                pieces.append((acts.unit[rows], acts.norm[rows]))
        self.chunk.append(torch.full((take,), chunk_index, dtype=torch.int64))
        self.n += take

    def gather(self, ranks: Ranks, d_a: int, d_b: int) -> None:
        """Under torchrun: every rank's rows, the first max_rows in chunk order, on every rank (as
        dense float32 rows of norm factor 1: the same bits)."""
        if not ranks.distributed:
            return
        shared = self.b is self.a
        dense_a, order = ranks.gather_kept(self._dense(self.a), self.chunk, self.max_rows, d_a)
        self.a = [[(x, torch.ones(len(x)))] for (x,) in dense_a]
        if shared:
            self.b = self.a
            return
        dense_b, _ = ranks.gather_kept(self._dense(self.b), self.chunk, self.max_rows, d_b, order)
        self.b = [[(y, torch.ones(len(y)))] for (y,) in dense_b]

    def _stores(self, extra_a: tuple, extra_b: tuple) -> list[tuple]:
        """(A's store, *extra_a) and, unless B's store is A's, (B's store, *extra_b)."""
        out = [(self.a, *extra_a)]
        return out if self.b is self.a else out + [(self.b, *extra_b)]

    @staticmethod
    def _dense(store) -> list[list[torch.Tensor]]:
        return [[unit.to(torch.float32) * norm[:, None] for unit, norm in pieces] for pieces in store]

    def layers(self) -> tuple[DenseLayers, DenseLayers]:
        """Per layer [n, d] rows of A and of B (the pieces are joined in place: one copy is held)."""
        for store, *_ in self._stores((), ()):
            for i, pieces in enumerate(store):
                if len(pieces) != 1:
                    store[i] = [(torch.cat([u for u, _ in pieces]), torch.cat([n for _, n in pieces]))]
        return tuple(DenseLayers([p[0][0] for p in s], [p[0][1] for p in s]) for s in (self.a, self.b))  # type: ignore[return-value]


class CentredBuilders:
    """Per layer, the first chunk's mean (the centre) and a dictionary over rows minus it."""

    def __init__(self, corpus: PairedCorpus, config: BuildConfig):
        self.a = layer_builders(corpus.lm_a, corpus.hps_a, corpus.ctx_a, config, centred=True)
        self.b = (
            self.a
            if corpus.self_compare
            else layer_builders(corpus.lm_b, corpus.hps_b, corpus.ctx_b, config, centred=True)
        )
        self.self_compare, self.shapes = corpus.self_compare, corpus.shapes
        self.centres_a = self.centres_b = None

    def update(self, fwd: list, ranks: Ranks, grams: GramPool | None = None) -> None:
        """One step; the centres: the first chunk with rows (no earlier chunk had any to add)."""
        la, da, lb, db = self.shapes
        if self.centres_a is None:
            self.centres_a = _first_chunk_means([f[1] for f in fwd], ranks, la, da)
        if self.centres_b is None:
            self.centres_b = (
                self.centres_a if self.self_compare else _first_chunk_means([f[2] for f in fwd], ranks, lb, db)
            )
        if self.centres_a is not None:
            ranks.update_builders(self.a, [f[1] for f in fwd], self.centres_a, grams)
        if self.centres_b is not None and not self.self_compare:
            ranks.update_builders(self.b, [f[2] for f in fwd], self.centres_b, grams)

    def bases(self) -> tuple[CentredDictionaries, CentredDictionaries]:
        """Both models' centres and dictionaries; the builders are let go one by one as they are read."""
        # the first pass paired rows (compare needs >= 4), so some chunk had rows and set the centres
        assert self.centres_a is not None and self.centres_b is not None
        basis_a = CentredDictionaries(self.centres_a, take_dictionaries(self.a))
        if self.self_compare:
            return basis_a, basis_a
        return basis_a, CentredDictionaries(self.centres_b, take_dictionaries(self.b))


@dataclass
class FirstPass:
    """The accumulators pass 1 feeds (None: not in the plan)."""

    grid: CKAGrid | None
    kept: KeptRows | None
    jaccard_a: list[DictionaryBuilder] | None
    jaccard_b: list[DictionaryBuilder] | None
    centred: CentredBuilders | None
    grams: GramPool  # the builders' Gram matrices, within the plan's budget
    paired: int = 0
    kept_matrices: dict[str, np.ndarray] | None = None  # computed once the kept rows are complete


def take_dictionaries(builders: list[DictionaryBuilder]) -> list:
    """Each builder's dictionary, the builder dropped from the list once read (emptied in place:
    one builder's atoms are copied at a time, never all of them)."""
    out = []
    while builders:
        out.append(builders.pop(0).dictionary())
    return out


def layer_builders(lm, hps, ctx, config: BuildConfig, centred: bool = False) -> list[DictionaryBuilder]:
    """One dictionary builder per hookpoint, its metadata naming the model, layer and corpus."""
    d, tokenizer = lm.config.hidden_size, lm.tokenizer_name  # the name hashes the vocabulary: once
    return [
        DictionaryBuilder(
            d,
            config,
            meta=DictionaryMeta(
                d=d,
                model=lm.name,
                hookpoint=hp.name,
                layer=hp.layer,
                tokenizer=tokenizer,
                dataset_fingerprint=ctx.fingerprint,
                build={"documents_fingerprint": ctx.documents_fingerprint, "centred": centred},
            ),
        )
        for hp in hps
    ]


def _accumulators(corpus: PairedCorpus, plan: ComparePlan) -> FirstPass:
    cfg = plan.config
    build = BuildConfig(k=cfg.k, min_cosine=cfg.min_cosine)
    la, _, lb, _ = corpus.shapes
    grid = None if plan.raw_grid is None else make_grid(plan.raw_grid, cfg.precision)
    kept = KeptRows(la, lb, cfg.max_rows, corpus.self_compare) if plan.keeps_rows else None
    jaccard_a = jaccard_b = None
    with GramPool(plan.gram_memory) as grams:  # every builder made here draws on it
        if plan.jaccard:
            jaccard_a = layer_builders(corpus.lm_a, corpus.hps_a, corpus.ctx_a, build)
            jaccard_b = (
                jaccard_a if corpus.self_compare else layer_builders(corpus.lm_b, corpus.hps_b, corpus.ctx_b, build)
            )
        centred = CentredBuilders(corpus, build) if plan.second_pass else None
    return FirstPass(grid, kept, jaccard_a, jaccard_b, centred, grams)


def _forward_step(corpus: PairedCorpus, mine: list, bar, ranks: Ranks, config: CompareConfig) -> list:
    """[(chunk index, batch of A, batch of B)] for this process's chunks of one step."""
    fwd, dtype = [], STREAM_DTYPES[config.stream_dtype]
    for ci, chunk in mine:
        batch_a, batch_b = forward_chunk(corpus, chunk, config.include_special, dtype)
        fwd.append((ci, batch_a, batch_b))
        bar.update(ranks.tokens_forwarded(batch_a[0].unit.shape[0]))
    return fwd


def _bar(corpus: PairedCorpus, ranks: Ranks, progress: bool, desc: str):
    return tqdm(
        total=corpus.text_tokens, unit="tok", unit_scale=True, disable=not progress or not ranks.is_root, desc=desc
    )


def first_pass(corpus: PairedCorpus, plan: ComparePlan, ranks: Ranks, progress: bool) -> FirstPass:
    """Forward every chunk once and feed the plan's pass-1 accumulators; sums and rows combined over ranks."""
    acc = _accumulators(corpus, plan)
    bar = _bar(corpus, ranks, progress, "compare")
    for mine in ranks.steps(corpus.chunks):
        fwd = _forward_step(corpus, mine, bar, ranks, plan.config)
        if acc.jaccard_a is not None:
            ranks.update_builders(acc.jaccard_a, [f[1] for f in fwd], grams=acc.grams)
            if not corpus.self_compare:
                assert acc.jaccard_b is not None  # made together with jaccard_a
                ranks.update_builders(acc.jaccard_b, [f[2] for f in fwd], grams=acc.grams)
        if acc.centred is not None:
            acc.centred.update(fwd, ranks, acc.grams)
        _feed_rows(acc, corpus, fwd, ranks)
        del fwd  # before the kept-rows measures and the next forward: one step's activations at a time
        trim_heap()
        if acc.kept is not None and acc.kept.full and not ranks.distributed:
            # complete: the kept-rows measures now, and the rows go (under torchrun they are gathered first)
            acc.kept_matrices = kept_row_matrices(plan, acc.kept, corpus.self_compare)
            acc.kept = None
            trim_heap()
    bar.close()
    acc.paired = ranks.sum_count(acc.paired)
    ranks.sum_grids(acc.grid)
    if acc.kept is not None:
        acc.kept.gather(ranks, corpus.shapes[1], corpus.shapes[3])
    return acc


def _feed_rows(acc: FirstPass, corpus: PairedCorpus, fwd: list, ranks: Ranks) -> None:
    """Pair the step's rows; feed the CKA grid and the kept rows, ROW_SLICE paired rows at a time."""
    pairs = []
    for ci, batch_a, batch_b in fwd:
        ia, ib = pair_rows(batch_a, batch_b, corpus.identity)
        acc.paired += len(ia)
        if acc.grid is None and (acc.kept is None or acc.kept.full):
            continue  # Jaccard only: the dense paired rows are not needed
        pairs.append((ci, batch_a, batch_b, ia, ib))
    # only the exact grid has pilot means (MinibatchCKAGrid.needs_pilots is False)
    if ranks.distributed and isinstance(acc.grid, StreamingCKAGrid) and acc.grid.needs_pilots:
        dense = [(ci, paired_rows(ba, ia), paired_rows(bb, ib)) for ci, ba, bb, ia, ib in pairs]
        _share_pilots(acc.grid, dense, ranks, corpus.shapes)
    for ci, batch_a, batch_b, ia, ib in pairs:
        for s in range(0, len(ia) if acc.grid is not None else 0, ROW_SLICE):
            assert acc.grid is not None  # per-layer lists: the grid copies what it keeps
            acc.grid.update(paired_rows(batch_a, ia[s : s + ROW_SLICE]), paired_rows(batch_b, ib[s : s + ROW_SLICE]))
        if acc.kept is not None and not acc.kept.full:
            acc.kept.add(ci, batch_a, ia, batch_b, ib)


def paired_rows(batch: list, rows: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the dense float32 activations of these rows (`ActBatch.dense()[rows]`, bit for bit)."""
    return [acts.unit[rows].to(torch.float32) * acts.norm[rows, None] for acts in batch]


def kept_row_matrices(plan: ComparePlan, kept: KeptRows | None, self_compare: bool) -> dict[str, np.ndarray]:
    """The kept-rows measures' [L_A, L_B] matrices (baselines and ITDA) from the kept rows."""
    cfg, out = plan.config, {}
    xs, ys = kept.layers() if kept is not None else ([], [])
    for m in plan.kept_rows:
        out[m] = similarity_grid(xs, ys, m, max_rows=cfg.max_rows)
    if plan.itda_kept_rows:
        out.update(
            itda_grids(xs, None if self_compare else ys, plan.itda_kept_rows, k=cfg.k, min_cosine=cfg.min_cosine)
        )
    return out


def _first_chunk_means(batches: list[list], ranks: Ranks, n_layers: int, d: int) -> torch.Tensor | None:
    """float32 [L, d]: each layer's mean over all rows of the earliest chunk with rows (the centres)."""
    means = ranks.earliest_means([[acts.dense() for acts in b] for b in batches], n_layers * d)
    return None if means is None else means.to(torch.float32).view(n_layers, d)


def _share_pilots(grid: StreamingCKAGrid, pairs: list, ranks: Ranks, shapes: tuple[int, int, int, int]) -> None:
    """Give every rank the same CKA pilot means: those of the paired rows of the earliest chunk of
    this step with rows."""
    la, da, lb, db = shapes
    means = ranks.earliest_means([xs + ys for _, xs, ys in pairs], la * da + lb * db)
    if means is not None:
        grid.set_pilots(means[: la * da].view(la, da), means[la * da :].view(lb, db))


def second_pass(
    corpus: PairedCorpus, plan: ComparePlan, ranks: Ranks, first: FirstPass, progress: bool
) -> PerTokenGrid:
    """Forward every chunk again; encode every paired token over the centred dictionaries."""
    assert first.centred is not None  # the first pass builds it whenever the plan has a second pass
    basis_a, basis_b = first.centred.bases()
    first.centred = None  # the builders' atoms and Gram matrices go; the bases hold the dictionaries
    grid = PerTokenGrid(
        basis_a,
        None if corpus.self_compare else basis_b,
        plan.config.k,
        plan.per_token,
        plan.per_token_grid,
        gram_memory=plan.gram_memory,
    )
    bar = _bar(corpus, ranks, progress, "compare: per-token ITDA")
    for mine in ranks.steps(corpus.chunks):
        fwd = _forward_step(corpus, mine, bar, ranks, plan.config)
        while fwd:
            _, batch_a, batch_b = fwd.pop(0)
            ia, ib = pair_rows(batch_a, batch_b, corpus.identity)
            for s in range(0, len(ia), PASS2_ROWS):  # the last piece lets each layer go once read
                last = s + PASS2_ROWS >= len(ia)
                pa, pb = ia[s : s + PASS2_ROWS], ib[s : s + PASS2_ROWS]
                rows_b = None if corpus.self_compare else _layer_reader(batch_b, pb, last)
                grid.update_layers(_layer_reader(batch_a, pa, last), batch_a[0].refs[pa], rows_b, batch_b[0].refs[pb])
        trim_heap()
    bar.close()
    ranks.sum_grids(grid)
    return grid


def _layer_reader(batch: list, rows: torch.Tensor, release: bool):
    """rows -> layer l's paired dense rows; with `release`, the layer's activations let go once read."""

    def read(layer: int) -> torch.Tensor:
        (x,) = paired_rows(batch[layer : layer + 1], rows)
        if release:
            batch[layer] = None
        return x

    return read
