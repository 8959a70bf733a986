"""Explorer views of dictionaries on a model's held-out tokens (loads models and corpora)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from itda.activations.corpus import read_documents, split_documents, tokenize_contexts
from itda.activations.hookpoints import parse_hookpoint
from itda.activations.models import load_model, same_tokenizer
from itda.activations.stream import iterate_batches
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.explore.data import check_refs, encode_stream, explorer_view


def dictionary_corpus(dictionary: Dictionary) -> str:
    """The corpus the dictionary records it was built on ('default' when it records none)."""
    return str(dictionary.meta.build.get("corpus") or "default")


def view_on_model(dictionary: Dictionary, *, label: str, model: str | None = None, corpus: str | None = None,
                  field: str = "text", tokens: int = 20_000, context: int = 128, k: int | None = None,
                  contexts: int = 5, device: str = "cpu", progress: bool = True, lm=None) -> dict:
    """One explorer view: the dictionary's source contexts and its usage on held-out tokens."""
    meta = dictionary.meta
    if not meta.hookpoint:
        raise ItdaInputError(f"{label}: the dictionary records no hookpoint (built from an activation file): "
                             "the explorer needs the model and hookpoint it was built at")
    model = model or meta.model
    if not model:
        raise ItdaInputError(f"{label}: the dictionary records no model; give --model")
    lm = lm or load_model(model, device=device)
    if meta.tokenizer and not same_tokenizer(meta.tokenizer, lm.tokenizer_name):
        raise ItdaInputError(f"tokenizer mismatch: {label} was built with {meta.tokenizer}, {model} has {lm.tokenizer_name}")
    corpus = corpus or dictionary_corpus(dictionary)
    docs = read_documents(corpus)
    check_refs(dictionary, docs, lm.tokenizer)
    ids = split_documents(docs, "heldout") or split_documents(docs, "all")
    ctx = tokenize_contexts(docs, ids, lm.tokenizer, context=context, max_tokens=tokens, tokenizer_name=lm.tokenizer_name)
    hp = parse_hookpoint(meta.hookpoint)
    k = min(k or meta.k, len(dictionary))
    bar = tqdm(total=int((~ctx.special).sum()), unit="tok", unit_scale=True, disable=not progress, desc=f"encode {label}")

    def batches():
        for b in iterate_batches(lm.model, [hp], ctx, dtype=torch.float32, device=device):
            bar.update(b[hp].unit.shape[0])
            yield b[hp]

    usage, stream_refs = encode_stream(dictionary.to(device), batches(), k)
    bar.close()
    view = explorer_view(dictionary, usage, docs, stream_refs, label=label, contexts=contexts)
    view.update(model=model, corpus=str(corpus))
    return view
