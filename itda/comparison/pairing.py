"""The shared corpus of a model comparison: both models' contexts, document chunks, paired rows.

Tokens are paired across models by (document, token position) when the tokenizers are the same
and by (document, char_end) otherwise (tokens that end at the same character have read the same
text). Chunks cover whole documents, about batch_tokens tokens of A each: the unit of a forward
pass and of what torchrun ranks share out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from itda.activations.corpus import Contexts, tokenize_contexts
from itda.activations.hookpoints import Hookpoint, n_layers
from itda.activations.models import LoadedModel, same_tokenizer
from itda.activations.stream import iterate_batches
from itda.comparison.jaccard import ref_keys

Chunk = tuple[tuple[int, int], tuple[int, int]]  # (rows of A, rows of B)


@dataclass
class PairedCorpus:
    """Both models over one corpus (lm_b is lm_a for a self-comparison)."""

    lm_a: LoadedModel
    lm_b: LoadedModel
    ctx_a: Contexts
    ctx_b: Contexts
    hps_a: list[Hookpoint]
    hps_b: list[Hookpoint]
    identity: str  # 'token' or 'char'
    self_compare: bool
    chunks: list[Chunk]

    @property
    def text_tokens(self) -> int:
        """Tokens of A that are not special (what the progress bars count)."""
        return int((~self.ctx_a.special).sum())

    @property
    def shapes(self) -> tuple[int, int, int, int]:
        """(L_A, d_A, L_B, d_B)."""
        return len(self.hps_a), self.lm_a.config.hidden_size, len(self.hps_b), self.lm_b.config.hidden_size


def pair_corpus(
    lm_a: LoadedModel,
    lm_b: LoadedModel | None,
    docs: Sequence[str],
    doc_ids: Iterable[int],
    *,
    tokens: int,
    context: int,
    batch_tokens: int,
) -> PairedCorpus:
    """Tokenize the documents for both models (B: the documents A covers) and cut them into chunks."""
    self_compare = lm_b is None
    lm_b = lm_a if lm_b is None else lm_b
    ctx_a = tokenize_contexts(
        docs, doc_ids, lm_a.tokenizer, context=context, max_tokens=tokens, tokenizer_name=lm_a.tokenizer_name
    )
    covered = list(dict.fromkeys(int(d) for d in _row_docs(ctx_a) if d >= 0))
    same_tok = self_compare or same_tokenizer(lm_a.tokenizer_name, lm_b.tokenizer_name)
    ctx_b = (
        ctx_a
        if same_tok
        else tokenize_contexts(docs, covered, lm_b.tokenizer, context=context, tokenizer_name=lm_b.tokenizer_name)
    )
    hps_a = [Hookpoint("resid_post", i) for i in range(n_layers(lm_a.model))]
    hps_b = [Hookpoint("resid_post", i) for i in range(n_layers(lm_b.model))]
    chunks = list(_doc_chunks(_row_docs(ctx_a), _row_docs(ctx_b), max(1, batch_tokens // context)))
    return PairedCorpus(lm_a, lm_b, ctx_a, ctx_b, hps_a, hps_b, "token" if same_tok else "char", self_compare, chunks)


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


def forward_chunk(
    corpus: PairedCorpus, chunk: Chunk, include_special: bool, dtype: torch.dtype = torch.float16
) -> tuple[list, list]:
    """Every layer's activations (itda.activations.stream batches, unit rows in `dtype`) of both
    models on one chunk."""
    (sa, ea), (sb, eb) = chunk
    batch_a = _forward_all(corpus.lm_a, corpus.hps_a, corpus.ctx_a.rows(sa, ea), include_special, dtype)
    if corpus.self_compare:
        return batch_a, batch_a
    return batch_a, _forward_all(corpus.lm_b, corpus.hps_b, corpus.ctx_b.rows(sb, eb), include_special, dtype)


def pair_rows(batch_a, batch_b, identity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (ia, ib) of the tokens both batches hold, in A's row order."""
    ka, kb = ref_keys(batch_a[0].refs, identity), ref_keys(batch_b[0].refs, identity)
    _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    return torch.from_numpy(np.sort(ia)), torch.from_numpy(ib[np.argsort(ia)])


def _forward_all(
    lm: LoadedModel, hps: list[Hookpoint], ctx: Contexts, include_special: bool, dtype: torch.dtype
) -> list:
    parts = list(
        iterate_batches(lm.model, hps, ctx, batch_contexts=len(ctx), dtype=dtype, include_special=include_special)
    )
    return [parts[0][hp] for hp in hps]
