"""Explorer views of dictionaries on a model's held-out tokens (loads models and corpora)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from itda.activations.corpus import read_documents, split_documents, tokenize_contexts
from itda.activations.models import model_at_hookpoint
from itda.activations.stream import iterate_batches
from itda.dictionary import Dictionary
from itda.explorer.data import check_refs, explorer_view, logit_cards
from itda.explorer.logits import direct_logit_effects


class Explorer(NamedTuple):
    """A written explorer: its page, one view per dictionary, the atoms two dictionaries share (None for one)."""

    index: Path
    views: list[dict]
    shared: list | None


def dictionary_corpus(dictionary: Dictionary) -> str:
    """The corpus the dictionary records it was built on ('default' when it records none)."""
    return str(dictionary.meta.build.get("corpus") or "default")


class SaeLatents:
    """An SAE as the explorer shows it: one card per latent (decoder row), no source tokens."""

    def __init__(self, loaded):
        cfg, meta = loaded.sae.cfg, loaded.meta
        self.atoms = loaded.sae.W_dec.detach()
        self.refs = torch.full((cfg.n_latents, 5), -1, dtype=torch.int64)
        self.meta = SimpleNamespace(
            model=meta.model, hookpoint=meta.hookpoint, tokenizer=meta.tokenizer, k=cfg.k, d=cfg.d_in
        )

    def __len__(self) -> int:
        return len(self.refs)


def sae_view_on_model(
    loaded,
    *,
    label: str,
    model: str | None = None,
    corpus: str | None = None,
    field: str = "text",
    tokens: int = 20_000,
    context: int = 128,
    contexts: int = 5,
    device: str | torch.device = "auto",
    progress: bool = True,
    lm=None,
) -> dict:
    """One explorer view of an SAE (itda.sae.LoadedSae): its latents' usage by the SAE's own inference
    rule on held-out tokens of the corpus (default: the default corpus)."""
    from itda.pursuit.codes import SparseCodes

    lm, hp = model_at_hookpoint(loaded, model, needs=f"the explorer ({label})", device=device, lm=lm)
    sae = loaded.sae.to(lm.device).eval()
    latents = SaeLatents(loaded)

    def encode(x):
        with torch.no_grad():
            enc = sae.encode(x.to(sae.W_enc.dtype), training=False)
            x_hat = sae.decode(enc.top_acts, enc.top_indices)
        codes = SparseCodes(enc.top_indices, enc.top_acts.float(), torch.zeros(len(x)))
        return codes, torch.nn.functional.cosine_similarity(x_hat.float(), x, dim=1)

    docs, usage, stream_refs = _held_out_usage(
        lm, hp, encode, len(latents), corpus or "default", field, tokens, context, label, progress
    )
    effects = direct_logit_effects(lm.model, latents.atoms)
    cards = None if effects is None else logit_cards(effects, lm.tokenizer)
    view = explorer_view(latents, usage, docs, stream_refs, label=label, contexts=contexts, logits=cards)  # type: ignore[arg-type]
    view.update(model=lm.name, corpus=str(corpus or "default"), kind="sae")
    return view


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
    from itda.evaluation.metrics import recon_terms

    lm, hp = model_at_hookpoint(dictionary, model, needs=f"the explorer ({label})", device=device, lm=lm)
    corpus = corpus or dictionary_corpus(dictionary)
    k = dictionary.encoding_k(k)
    on_device = dictionary.to(lm.device)
    atoms = on_device.atoms.to(torch.float32)

    def encode(x):
        codes = on_device.encode(x, k)
        return codes, recon_terms(x, codes, atoms).cosine

    docs, usage, stream_refs = _held_out_usage(
        lm,
        hp,
        encode,
        len(dictionary),
        corpus,
        field,
        tokens,
        context,
        label,
        progress,
        check=lambda d: check_refs(dictionary, d, lm.tokenizer),
    )
    effects = direct_logit_effects(lm.model, dictionary.atoms)
    cards = None if effects is None else logit_cards(effects, lm.tokenizer)
    view = explorer_view(dictionary, usage, docs, stream_refs, label=label, contexts=contexts, logits=cards)
    view.update(model=lm.name, corpus=str(corpus))
    return view


def _held_out_usage(
    lm, hp, encode, n_atoms: int, corpus: str, field, tokens: int, context: int, label: str, progress, check=None
):
    """(docs, AtomUsage, every token's refs) of `encode(x) -> (SparseCodes, cosine)` over the held-out
    split of the corpus (all of it when it has none); check(docs) first refuses a wrong corpus."""
    from itda.explorer.usage import AtomUsageAccumulator

    docs = read_documents(corpus, field)
    if check is not None:
        check(docs)
    ids = split_documents(docs, "heldout") or split_documents(docs, "all")
    ctx = tokenize_contexts(
        docs, ids, lm.tokenizer, context=context, max_tokens=tokens, tokenizer_name=lm.tokenizer_name
    )
    bar = tqdm(
        total=int((~ctx.special).sum()), unit="tok", unit_scale=True, disable=not progress, desc=f"encode {label}"
    )
    acc, refs = AtomUsageAccumulator(n_atoms), []
    for b in iterate_batches(lm.model, [hp], ctx, dtype=torch.float32, device=lm.device):
        x = b[hp].dense()
        codes, cosine = encode(x)
        acc.update(codes, cosine)
        refs.append(b[hp].refs.numpy())
        bar.update(x.shape[0])
    bar.close()
    return docs, acc.result(), np.concatenate(refs) if refs else np.zeros((0, 5), np.int64)
