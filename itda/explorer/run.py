"""Explorer views of dictionaries on a model's held-out tokens (loads models and corpora)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from itda.activations.corpus import read_documents, split_documents, tokenize_contexts
from itda.activations.models import model_at_hookpoint
from itda.activations.stream import iterate_batches
from itda.dictionary import Dictionary
from itda.explorer.data import check_refs, encode_stream, explorer_view, logit_cards
from itda.explorer.logits import direct_logit_effects


class Explorer(NamedTuple):
    """A written explorer: its page, one view per dictionary, the atoms two dictionaries share (None for one)."""

    index: Path
    views: list[dict]
    shared: list | None


def dictionary_corpus(dictionary: Dictionary) -> str:
    """The corpus the dictionary records it was built on ('default' when it records none)."""
    return str(dictionary.meta.build.get("corpus") or "default")


def view_on_model(
    dictionary: Dictionary,
    *,
    label: str,
    model: str | None = None,
    corpus: str | None = None,
    field: str = "text",
    tokens: int = 20_000,
    context: int = 128,
    k: int | None = None,
    contexts: int = 5,
    device: str | torch.device = "auto",
    progress: bool = True,
    lm=None,
) -> dict:
    """One explorer view: the dictionary's source contexts and its usage on held-out tokens."""
    lm, hp = model_at_hookpoint(dictionary, model, needs=f"the explorer ({label})", device=device, lm=lm)
    device = lm.device
    corpus = corpus or dictionary_corpus(dictionary)
    docs = read_documents(corpus, field)
    check_refs(dictionary, docs, lm.tokenizer)
    ids = split_documents(docs, "heldout") or split_documents(docs, "all")
    ctx = tokenize_contexts(
        docs, ids, lm.tokenizer, context=context, max_tokens=tokens, tokenizer_name=lm.tokenizer_name
    )
    k = dictionary.encoding_k(k)
    bar = tqdm(
        total=int((~ctx.special).sum()), unit="tok", unit_scale=True, disable=not progress, desc=f"encode {label}"
    )

    def batches():
        for b in iterate_batches(lm.model, [hp], ctx, dtype=torch.float32, device=device):
            bar.update(b[hp].unit.shape[0])
            yield b[hp]

    usage, stream_refs = encode_stream(dictionary.to(device), batches(), k)
    bar.close()
    effects = direct_logit_effects(lm.model, dictionary.atoms)
    cards = None if effects is None else logit_cards(effects, lm.tokenizer)
    view = explorer_view(dictionary, usage, docs, stream_refs, label=label, contexts=contexts, logits=cards)
    view.update(model=lm.name, corpus=str(corpus))
    return view
