"""Compare two models layer by layer over a shared corpus (one pass; two with per-token ITDA measures).

Both models read the same documents. Tokens are paired across models by (document, token
position) when the tokenizers are the same and by (document, char_end) otherwise (tokens that
end at the same character have read the same text). Every layer of each model is captured in
one forward pass per batch of documents; the pass feeds the streaming CKA grid (all layer
pairs), a bounded sample of paired rows for the in-memory measures, and one ITDA dictionary
per layer for the Jaccard measures (and, for the per-token ITDA measures: itda_fused,
itda_scaled_*, itda_loss_profile, itda_recon_cka, one per layer over rows centred by the first
document chunk's mean). Those take a second pass that encodes every paired token over the
centred dictionaries (itda.comparison.per_token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from itda.activations.corpus import Contexts, tokenize_contexts
from itda.activations.hookpoints import Hookpoint, n_layers
from itda.activations.models import LoadedModel, same_tokenizer
from itda.activations.stream import iterate_batches
from itda.builder import BuildConfig, DictionaryBuilder
from itda.comparison.itda_measures import ITDA_MEASURES, PER_TOKEN, itda_grids
from itda.comparison.jaccard import SIZE_CONTROLS, jaccard, jaccard_union, ref_keys
from itda.comparison.measures import IN_MEMORY, STREAMED, check_measures, similarity_grid
from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes
from itda.comparison.per_token import CentredDictionaries, PerTokenGrid
from itda.comparison.streaming import StreamingCKAGrid
from itda.dictionary import Dictionary, DictionaryMeta
from itda.errors import ItdaInputError


@dataclass
class ModelComparison:
    name_a: str
    name_b: str
    layers_a: int
    layers_b: int
    matrices: dict[str, np.ndarray]  # measure -> [L_A, L_B]
    paired_tokens: int
    identity: str  # 'token' or 'char'
    seconds: float
    model_level: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # which estimators ran, and why
    dictionaries_a: list[Dictionary] = field(default_factory=list)  # the Jaccard dictionaries
    dictionaries_b: list[Dictionary] = field(default_factory=list)
    per_token_basis_a: CentredDictionaries | None = None  # what the per-token ITDA measures encoded over
    per_token_basis_b: CentredDictionaries | None = None


def _row_docs(ctx: Contexts) -> np.ndarray:
    return ctx.refs[..., 0].max(dim=1).values.numpy()


def _doc_chunks(row_docs_a: np.ndarray, row_docs_b: np.ndarray, rows_per_chunk: int):
    """Yield (rows_a range, rows_b range) covering whole documents, about rows_per_chunk rows of A each."""
    sa = sb = 0
    while sa < len(row_docs_a):
        ea = min(sa + rows_per_chunk, len(row_docs_a))
        while ea < len(row_docs_a) and row_docs_a[ea] == row_docs_a[ea - 1]:
            ea += 1
        last_doc = row_docs_a[ea - 1]
        eb = sb
        while eb < len(row_docs_b) and row_docs_b[eb] <= last_doc:
            eb += 1
        yield (sa, ea), (sb, eb)
        sa, sb = ea, eb


def compare_models(
    lm_a: LoadedModel,
    lm_b: LoadedModel | None,
    docs: list[str],
    doc_ids: list[int],
    *,
    tokens: int,
    measures: list[str],
    context: int = 128,
    k: int = 40,
    min_cosine: float = 0.85,
    max_rows: int = 4096,
    precision: str = "float64",
    batch_tokens: int = 4096,
    include_special: bool = False,
    progress: bool = True,
    cka_memory: int = 1 << 30,
    cka_minibatch: int = 1024,
    exchange=None,
    interleave: int = 1,
) -> ModelComparison:
    """Similarity matrices [L_A, L_B] for each measure; lm_b=None compares lm_a with itself.

    Linear CKA runs exactly (float64 streaming sums, O(L_A d_A L_B d_B) memory) when those
    accumulators fit `cka_memory` bytes, else as minibatch CKA (unbiased HSIC averaged over
    minibatches of `cka_minibatch` paired tokens, O((L_A + L_B) m^2) memory): `notes` says which.
    The per-token ITDA measures' CKA grids follow the same rule, each grid on its own
    (`itda.comparison.per_token.PerTokenGrid`).

    exchange (itda.builder.distributed.Exchange, under torchrun): rank r forwards the document chunks
    r, r + W, ...; the CKA sums are added up over ranks, the kept rows gathered in chunk order, the
    Jaccard dictionaries built with the ranks' candidates gathered per step; rank 0 gets the full
    result, the other ranks an empty one. One process with interleave=W gives the same result
    (CKA up to float64 summation order; minibatch CKA differs, its minibatches being per rank).
    """
    check_measures(measures)
    t0 = time.perf_counter()
    self_compare = lm_b is None
    lm_b = lm_a if lm_b is None else lm_b
    ctx_a = tokenize_contexts(docs, doc_ids, lm_a.tokenizer, context=context, max_tokens=tokens, tokenizer_name=lm_a.tokenizer_name)
    covered = list(dict.fromkeys(int(d) for d in _row_docs(ctx_a) if d >= 0))
    same_tok = same_tokenizer(lm_a.tokenizer_name, lm_b.tokenizer_name)
    ctx_b = ctx_a if self_compare or same_tok else tokenize_contexts(
        docs, covered, lm_b.tokenizer, context=context, tokenizer_name=lm_b.tokenizer_name)
    identity = "token" if (self_compare or same_tok) else "char"
    hps_a = [Hookpoint("resid_post", i) for i in range(n_layers(lm_a.model))]
    hps_b = [Hookpoint("resid_post", i) for i in range(n_layers(lm_b.model))]
    notes: list[str] = []
    grid = mb_grid = None
    if set(STREAMED) & set(measures):
        need = exact_grid_bytes(len(hps_a), lm_a.config.hidden_size, len(hps_b), lm_b.config.hidden_size)
        if need <= cka_memory:
            grid = StreamingCKAGrid(precision)
            notes.append(f"linear CKA: exact streaming ({need / 2**30:.2f} GiB of accumulators)")
        else:
            mb_grid = MinibatchCKAGrid(cka_minibatch)
            notes.append(f"linear CKA: minibatch estimator, {cka_minibatch} tokens per minibatch (the exact accumulators "
                         f"would need {need / 2**30:.1f} GiB > {cka_memory / 2**30:.1f} GiB); reported as cka_minibatch; "
                         "procrustes needs the exact path")
    per_token = [m for m in measures if m in PER_TOKEN]  # streamed in a second pass
    wants_itda = [m for m in measures if m in ITDA_MEASURES and m not in PER_TOKEN]
    wants_mem = [m for m in measures if m in IN_MEMORY] + wants_itda
    kept_a: list[list[torch.Tensor]] = [[] for _ in hps_a]
    kept_b: list[list[torch.Tensor]] = [[] for _ in hps_b]
    n_kept = 0
    cfg = BuildConfig(k=k, min_cosine=min_cosine)

    def make(lm, hps, ctx, centred=False):
        d = lm.config.hidden_size
        return [DictionaryBuilder(d, cfg, meta=DictionaryMeta(
            d=d, model=lm.name, hookpoint=hp.name, layer=hp.layer, tokenizer=lm.tokenizer_name,
            dataset_fingerprint=ctx.fingerprint, build={"documents_fingerprint": ctx.documents_fingerprint,
                                                        "centred": centred})) for hp in hps]

    builders_a = builders_b = centred_a = centred_b = centres_a = centres_b = None
    if "jaccard" in measures:
        builders_a = make(lm_a, hps_a, ctx_a)
        builders_b = builders_a if self_compare else make(lm_b, hps_b, ctx_b)
    if per_token:
        centred_a = make(lm_a, hps_a, ctx_a, centred=True)
        centred_b = centred_a if self_compare else make(lm_b, hps_b, ctx_b, centred=True)
    paired = 0
    rank = exchange.rank if exchange is not None else 0
    world = exchange.world if exchange is not None else max(1, interleave)
    bar = tqdm(total=int((~ctx_a.special).sum()), unit="tok", unit_scale=True, disable=not progress or rank != 0,
               desc="compare")
    chunks = list(_doc_chunks(_row_docs(ctx_a), _row_docs(ctx_b), max(1, batch_tokens // context)))

    def forward_step(mine, bar):
        fwd = []
        for ci, ((sa, ea), (sb, eb)) in mine:
            batch_a = _forward_all(lm_a, hps_a, ctx_a.rows(sa, ea), include_special)
            batch_b = batch_a if self_compare else _forward_all(lm_b, hps_b, ctx_b.rows(sb, eb), include_special)
            fwd.append((ci, batch_a, batch_b))
            bar.update(batch_a[0].unit.shape[0] * (world if exchange is not None else 1))
        return fwd

    kept_chunk: list[torch.Tensor] = []  # chunk index of every kept row (ranks gather them in chunk order)
    for first in range(0, len(chunks), world):
        step = list(enumerate(chunks[first : first + world], first))
        mine = step if exchange is None else step[rank : rank + 1]
        fwd = forward_step(mine, bar)
        if builders_a is not None:
            _update_builders(builders_a, [f[1] for f in fwd], exchange)
            if not self_compare:
                _update_builders(builders_b, [f[2] for f in fwd], exchange)
        if centred_a is not None:  # centres: the first chunk with rows (no earlier chunk had any to add)
            if centres_a is None:
                centres_a = _first_chunk_means([f[1] for f in fwd], exchange, len(hps_a), lm_a.config.hidden_size)
            if centres_b is None:
                centres_b = centres_a if self_compare else _first_chunk_means(
                    [f[2] for f in fwd], exchange, len(hps_b), lm_b.config.hidden_size)
            if centres_a is not None:
                _update_builders(centred_a, [f[1] for f in fwd], exchange, centres_a)
            if centres_b is not None and not self_compare:
                _update_builders(centred_b, [f[2] for f in fwd], exchange, centres_b)
        pairs = []
        for ci, batch_a, batch_b in fwd:
            ia, ib = _pair_rows(batch_a, batch_b, identity)
            paired += len(ia)
            if grid is None and mb_grid is None and not (wants_mem and n_kept < max_rows):
                continue  # Jaccard only: the dense paired rows are not needed
            pairs.append((ci, [acts.dense()[ia] for acts in batch_a], [acts.dense()[ib] for acts in batch_b]))
        if exchange is not None and grid is not None and grid.a is None:
            _share_pilots(grid, pairs, exchange, hps_a, hps_b, lm_a, lm_b)
        for ci, xs, ys in pairs:
            if not len(xs[0]):
                continue
            if grid is not None:
                grid.update(torch.stack(xs), torch.stack(ys))
            if mb_grid is not None:
                mb_grid.update(xs, ys)
            if wants_mem and n_kept < max_rows:
                take = min(max_rows - n_kept, len(xs[0]))
                for store, x in zip(kept_a, xs):
                    store.append(x[:take])
                for store, y in zip(kept_b, ys):
                    store.append(y[:take])
                kept_chunk.append(torch.full((take,), ci, dtype=torch.int64))
                n_kept += take
    bar.close()
    if exchange is not None:
        paired = int(exchange.sum_(torch.tensor([float(paired)], dtype=torch.float64)).item())
        if grid is not None:
            grid.sum_over(exchange)
        if mb_grid is not None:
            mb_grid.sum_over(exchange, len(hps_a), len(hps_b))
        if wants_mem:
            kept_a, kept_b = _gather_kept(kept_a, kept_b, kept_chunk, exchange, max_rows,
                                          lm_a.config.hidden_size, lm_b.config.hidden_size)
    if paired < 4:
        raise ItdaInputError(f"only {paired} tokens could be paired between the models")
    dicts_a = dicts_b = basis_a = basis_b = None
    if builders_a is not None and rank == 0:
        dicts_a = [b.dictionary() for b in builders_a]
        dicts_b = dicts_a if self_compare else [b.dictionary() for b in builders_b]
    per_token_grid = None
    if per_token:
        basis_a = CentredDictionaries(centres_a, [b.dictionary() for b in centred_a])
        basis_b = basis_a if self_compare else CentredDictionaries(centres_b, [b.dictionary() for b in centred_b])
        per_token_grid = PerTokenGrid(basis_a, None if self_compare else basis_b, k, per_token,
                                      memory=cka_memory, minibatch=cka_minibatch)
        notes.append("itda per-token measures: every paired token, second pass over the corpus, leave-one-out MP over "
                     "dictionaries of the layer's rows centred by the first document chunk's mean")
        if per_token_grid.note:
            notes.append(per_token_grid.note)
        bar = tqdm(total=int((~ctx_a.special).sum()), unit="tok", unit_scale=True,
                   disable=not progress or rank != 0, desc="compare: per-token ITDA")
        for first in range(0, len(chunks), world):
            step = list(enumerate(chunks[first : first + world], first))
            for _, batch_a, batch_b in forward_step(step if exchange is None else step[rank : rank + 1], bar):
                ia, ib = _pair_rows(batch_a, batch_b, identity)
                per_token_grid.update([acts.dense()[ia] for acts in batch_a], batch_a[0].refs[ia],
                                      None if self_compare else [acts.dense()[ib] for acts in batch_b],
                                      batch_b[0].refs[ib])
        bar.close()
        if exchange is not None:
            per_token_grid.sum_over(exchange)
    if rank != 0:  # the other ranks' part is done; rank 0 reports
        return ModelComparison(lm_a.name, lm_b.name, len(hps_a), len(hps_b), {}, paired, identity,
                               time.perf_counter() - t0, notes=notes)
    matrices: dict[str, np.ndarray] = {}
    if grid is not None:
        mats = grid.matrices(procrustes="procrustes" in measures)
        matrices.update({m: mats[m] for m in STREAMED if m in measures})
    if mb_grid is not None:
        matrices["cka_minibatch"] = mb_grid.matrix()
    xs_mem = [torch.cat(s) for s in kept_a] if wants_mem else []
    ys_mem = [torch.cat(s) for s in kept_b] if wants_mem else []
    for m in wants_mem:
        if m not in ITDA_MEASURES:
            matrices[m] = similarity_grid(xs_mem, ys_mem, m, max_rows=max_rows)
    if per_token_grid is not None:
        matrices.update(per_token_grid.matrices())
    if wants_itda:
        matrices.update(itda_grids(xs_mem, None if self_compare else ys_mem, wants_itda, k=k, min_cosine=min_cosine))
    result = ModelComparison(lm_a.name, lm_b.name, len(hps_a), len(hps_b), matrices, paired, identity,
                             time.perf_counter() - t0, notes=notes)
    if dicts_a is not None:
        result.dictionaries_a, result.dictionaries_b = dicts_a, dicts_b
    result.per_token_basis_a, result.per_token_basis_b = basis_a, basis_b
    if "jaccard" in measures:
        result.matrices.update(jaccard_matrices(result.dictionaries_a, result.dictionaries_b))
        result.model_level["jaccard_model"] = jaccard_union(result.dictionaries_a, result.dictionaries_b).value
    result.seconds = time.perf_counter() - t0
    return result


def jaccard_matrices(dicts_a: list[Dictionary], dicts_b: list[Dictionary]) -> dict[str, np.ndarray]:
    """jaccard_raw / jaccard_crop / jaccard_chance matrices [L_A, L_B]."""
    out = {}
    for size in SIZE_CONTROLS:
        out[f"jaccard_{size}"] = np.array([[jaccard(a, b, size=size).value for b in dicts_b] for a in dicts_a])
    return out


def _update_builders(builders: list[DictionaryBuilder], batches: list[list], exchange,
                     centres_LD: torch.Tensor | None = None) -> None:
    """One build step per layer: this rank's batch with the ranks' candidates gathered (exchange),
    or the step's batches concatenated and scored batch by batch (one process, interleave); with
    centres_LD, over the rows minus their layer's centre."""
    for layer, builder in enumerate(builders):
        parts = [b[layer].unit if centres_LD is None else b[layer].dense() - centres_LD[layer] for b in batches]
        refs = [b[layer].refs for b in batches]
        if exchange is not None:
            rows = parts[0] if parts else torch.zeros(0, builder.d)
            builder.update(rows, refs[0] if refs else torch.zeros(0, 5, dtype=torch.int64), exchange=exchange)
        elif parts:
            builder.update(torch.cat(parts), torch.cat(refs), score_chunk=[len(p) for p in parts])


def _earliest_means(chunks: list[list[torch.Tensor]], exchange, width: int) -> torch.Tensor | None:
    """float64 [width]: the per-layer row means, concatenated, of the earliest of this step's chunks
    with rows (each chunk: its layers' [n, d] rows), the same on every rank (None: none has rows)."""
    mine = [torch.cat([x.double().mean(0) for x in layers]) for layers in chunks if len(layers[0])]
    rows = torch.stack(mine[:1]) if mine else torch.zeros(0, width, dtype=torch.float64)
    if exchange is not None:
        rows = exchange.gather_rows(rows)
    return rows[0] if len(rows) else None


def _first_chunk_means(batches: list[list], exchange, n_layers: int, d: int) -> torch.Tensor | None:
    """float32 [L, d]: each layer's mean over all rows of the earliest chunk with rows (the centres)."""
    means = _earliest_means([[acts.dense() for acts in b] for b in batches], exchange, n_layers * d)
    return None if means is None else means.to(torch.float32).view(n_layers, d)


def _share_pilots(grid: StreamingCKAGrid, pairs, exchange, hps_a, hps_b, lm_a, lm_b) -> None:
    """Give every rank the same CKA pilot means: those of the paired rows of the earliest chunk of
    this step with rows."""
    la, lb, da, db = len(hps_a), len(hps_b), lm_a.config.hidden_size, lm_b.config.hidden_size
    means = _earliest_means([xs + ys for _, xs, ys in pairs], exchange, la * da + lb * db)
    if means is not None:
        grid.set_pilots(means[: la * da].view(la, da), means[la * da :].view(lb, db))


def _gather_kept(kept_a, kept_b, kept_chunk, exchange, max_rows: int, da: int, db: int):
    """The first max_rows paired rows in chunk order, from every rank's kept rows (same on all ranks)."""
    chunk = exchange.gather_rows(torch.cat(kept_chunk) if kept_chunk else torch.zeros(0, dtype=torch.int64))
    order = torch.sort(chunk, stable=True).indices[:max_rows]

    def side(kept, d):
        return [[exchange.gather_rows(torch.cat(s) if s else torch.zeros(0, d))[order]] for s in kept]

    return side(kept_a, da), side(kept_b, db)


def _pair_rows(batch_a, batch_b, identity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (ia, ib) of the tokens both batches hold, in A's row order."""
    ka, kb = ref_keys(batch_a[0].refs, identity), ref_keys(batch_b[0].refs, identity)
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return torch.from_numpy(np.sort(ia)), torch.from_numpy(ib[np.argsort(ia)])


def _forward_all(lm: LoadedModel, hps: list[Hookpoint], ctx: Contexts, include_special: bool):
    out = []
    parts = list(iterate_batches(lm.model, hps, ctx, batch_contexts=len(ctx), dtype=torch.float32,
                                 include_special=include_special))
    for hp in hps:
        out.append(parts[0][hp])
    return out
