"""Stream a corpus through a model and record, per document, which dictionary atoms its tokens use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from itda.activations.corpus import tokenize_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import LoadedModel
from itda.activations.stream import iterate_batches
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.pursuit.codes import atom_totals


class DocSupports(NamedTuple):
    doc_ids: np.ndarray  # [D] corpus index of each row
    sets: sp.csr_matrix  # [D, N] 1 where a token of the document uses the atom
    tokens: np.ndarray  # [D] tokens read per document


def document_supports(
    lm: LoadedModel,
    dictionary: Dictionary,
    hp: Hookpoint,
    docs: Sequence[str],
    doc_ids: Sequence[int],
    *,
    k: int,
    support_atoms: int = 4,
    context: int = 128,
    max_doc_tokens: int | None = None,
    docs_per_step: int = 64,
    batch_contexts: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> DocSupports:
    """A document's support: the atoms that are among the `support_atoms` strongest (largest
    |total coefficient|) of at least one of its tokens. Documents are tokenized, run and encoded
    `docs_per_step` at a time (memory: one step's activations plus the sparse supports); each
    keeps its first max_doc_tokens tokens."""
    dictionary = dictionary.to(device)
    row_of = {int(d): i for i, d in enumerate(doc_ids)}
    n = len(dictionary)
    pairs, tokens = [], np.zeros(len(doc_ids), dtype=np.int64)  # per step: unique doc_row * n + atom
    bar = tqdm(total=len(doc_ids), unit="doc", disable=not progress, desc="supports")
    for s in range(0, len(doc_ids), docs_per_step):
        step_ids = list(doc_ids[s : s + docs_per_step])
        try:
            ctx = tokenize_contexts(
                docs,
                step_ids,
                lm.tokenizer,
                context=context,
                tokenizer_name=lm.tokenizer_name,
                max_doc_tokens=max_doc_tokens,
            )
        except ItdaInputError:  # only empty documents in this step
            bar.update(len(step_ids))
            continue
        step_pairs = []
        for batch in iterate_batches(
            lm.model, [hp], ctx, batch_contexts=batch_contexts, dtype=torch.float32, device=device
        ):
            acts = batch[hp]
            codes = dictionary.encode(acts.dense(), k)
            tok_rows, slots = strongest_atoms(codes, support_atoms)
            doc_rows = np.array([row_of[int(d)] for d in acts.refs[:, 0].tolist()], dtype=np.int64)
            np.add.at(tokens, doc_rows, 1)
            step_pairs.append(doc_rows[tok_rows.numpy()] * n + codes.indices.cpu()[tok_rows, slots].numpy())
        if step_pairs:  # a document lies within one step: its pairs are final (memory: distinct pairs only)
            pairs.append(np.unique(np.concatenate(step_pairs)))
        bar.update(len(step_ids))
        bar.set_postfix(tokens=int(tokens.sum()), refresh=False)
    bar.close()
    keys = np.concatenate(pairs) if pairs else np.zeros(0, np.int64)
    sets = sp.csr_matrix((np.ones(len(keys), np.float32), (keys // n, keys % n)), shape=(len(doc_ids), n))
    return DocSupports(np.asarray(doc_ids, dtype=np.int64), sets, tokens)


def strongest_atoms(codes, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token rows, slots) of each token's m distinct atoms with the largest |total coefficient|."""
    totals, used = atom_totals(codes)
    strength = torch.where(used, totals.abs(), torch.full_like(totals, -1.0))
    m = min(m, strength.shape[1])
    top_vals, top_slots = torch.topk(strength, m, dim=1)
    keep = top_vals > 0
    rows = torch.arange(strength.shape[0])[:, None].expand(-1, m)
    return rows[keep], top_slots[keep]
