"""The explorer's data: one JSON-ready view per dictionary (atom cards, summary histograms).

A card holds the atom's source context (its document's text around the token, the token's
character span), its held-out usage (tokens using it, their share, mean coefficient), the
held-out contexts where its coefficient is largest (text plus every token's character span
and this atom's coefficient on it), its co-occurring atoms, a histogram of its coefficients on
the tokens using it and, for causal LMs, its direct logit effects (`itda.explorer.logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from itda.configfields import FieldError
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.explorer.usage import AtomUsage, co_occurrence, histogram

SOURCE_CHARS = 160  # characters shown on each side of an atom's source token
HIST_BINS = 12  # bins of each card's histogram of its coefficients


def check_refs(dictionary: Dictionary, docs: Sequence[str], tokenizer) -> None:
    """Refuse a corpus other than the one the dictionary was built on (document count, token ids)."""
    refs = dictionary.refs
    if not len(refs):
        return
    docs_needed = sorted({int(d) for d in refs[:, 0].tolist() if d >= 0})
    if docs_needed and docs_needed[-1] >= len(docs):
        raise FieldError(
            "corpus",
            f"the dictionary's atoms come from document {docs_needed[-1]}, the corpus has {len(docs)} "
            "documents: not the corpus it was built on ({field})",
        )
    ids = {d: tokenizer(docs[d], add_special_tokens=False)["input_ids"] for d in docs_needed}
    for i, (doc, pos, _cs, _ce, tok) in enumerate(refs.tolist()):
        if doc < 0 or pos < 0:
            continue
        have = ids[doc][pos] if pos < len(ids[doc]) else None
        if have != tok:
            raise ItdaInputError(
                f"atom {i}: document {doc} token {pos} is {have} in this corpus, the dictionary "
                f"recorded {tok}: not the corpus (or tokenizer) it was built on"
            )


def source_context(text: str, char_start: int, char_end: int, chars: int = SOURCE_CHARS) -> dict:
    """The text around [char_start, char_end) and the token's span within it."""
    s, e = max(0, char_start - chars), min(len(text), char_end + chars)
    return {"text": text[s:e], "hl": [char_start - s, char_end - s], "cut": [s > 0, e < len(text)]}


def held_out_context(
    atom: int, row: int, usage: AtomUsage, stream_refs: np.ndarray, docs: Sequence[str], window: int
) -> dict:
    """Tokens row-window..row+window of the same document: the text, every token's character span
    and this atom's coefficient on it (`spans` = [start, end, coefficient] * tokens, flat), and
    which token (`at`) is the one the context was chosen for."""
    doc = stream_refs[row, 0]
    lo, hi = max(0, row - window), min(len(stream_refs), row + window + 1)
    rows = np.arange(lo, hi)
    rows = rows[stream_refs[rows, 0] == doc]
    rows = rows[stream_refs[rows, 2] >= 0]
    base, end = int(stream_refs[rows[0], 2]), int(stream_refs[rows[-1], 3])
    coefs = usage.coefficients(atom, rows)
    spans = []  # flat: start, end, coefficient of each token (one array parses faster than many)
    for r, c in zip(rows, coefs, strict=True):
        spans += [int(stream_refs[r, 2]) - base, int(stream_refs[r, 3]) - base, round(float(c), 4)]
    return {"text": docs[doc][base:end], "spans": spans, "at": int(np.nonzero(rows == row)[0][0])}


def explorer_view(
    dictionary: Dictionary,
    usage: AtomUsage,
    docs: Sequence[str],
    stream_refs: np.ndarray,
    *,
    label: str,
    contexts: int = 5,
    window: int = 12,
    partners: int = 5,
    logits: list[dict] | None = None,
) -> dict:
    """The JSON-ready view of one dictionary (see the module docstring); `docs` is the whole corpus
    (atoms' and stream tokens' document indices point into it); logits: each atom's direct logit
    effects (`logit_cards`), for causal LMs."""
    n = len(dictionary)
    co_atoms, co_scores = (
        co_occurrence(usage, top=partners) if usage.tokens else (np.full((n, partners), -1), np.zeros((n, partners)))
    )
    mean_coef = usage.mean_coef_N
    refs = dictionary.refs.tolist()
    cards = []
    for a in range(n):
        card = _card(a, refs[a], usage, mean_coef, docs)
        rows, _ = usage.top_tokens(a, contexts)
        card["contexts"] = [held_out_context(a, int(r), usage, stream_refs, docs, window) for r in rows]
        card["cooc"] = [[int(p), round(float(s), 4)] for p, s in zip(co_atoms[a], co_scores[a], strict=True) if p >= 0]
        card["hist"] = coefficient_histogram(usage.pair_value[usage.atom_start[a] : usage.atom_start[a + 1]])
        if logits is not None:
            card["logits"] = logits[a]
        cards.append(card)
    meta = dictionary.meta
    summary = {
        "tokens": usage.tokens,
        "atoms": n,
        "dead": int((usage.count_N == 0).sum()),
        "mean_l0": float(usage.l0_T.mean()) if usage.tokens else 0.0,
        "mean_cosine": float(usage.cosine_T.mean()) if usage.tokens else 0.0,
        "usage_hist": histogram(usage.count_N, 20, log=True),
        "l0_hist": histogram(usage.l0_T, np.arange(0, max(int(usage.l0_T.max()) if usage.tokens else 1, 1) + 2) - 0.5),
        "cos_hist": histogram(
            usage.cosine_T, np.linspace(min(0.0, float(usage.cosine_T.min()) if usage.tokens else 0.0), 1.0, 41)
        ),
    }
    return {
        "label": label,
        "model": meta.model,
        "hookpoint": meta.hookpoint,
        "k": meta.k,
        "d": meta.d,
        "summary": summary,
        "atoms": cards,
    }


def _card(a: int, ref: list[int], usage: AtomUsage, mean_coef: np.ndarray, docs: Sequence[str]) -> dict:
    """An atom's identity, usage and source context (its text around the source token)."""
    doc, pos, cs, ce, tok = ref
    card = {
        "id": a,
        "doc": doc,
        "pos": pos,
        "token_id": tok,
        "uses": int(usage.count_N[a]),
        "freq": float(usage.count_N[a]) / max(usage.tokens, 1),
        "mean_coef": round(float(mean_coef[a]), 4),
    }
    if 0 <= doc < len(docs) and cs >= 0:
        text = docs[int(doc)]
        card["source"], card["token"] = source_context(text, cs, ce), text[cs:ce]
    else:
        card["source"], card["token"] = None, "" if pos >= 0 else "<special>"
    return card


def coefficient_histogram(values: np.ndarray, bins: int = HIST_BINS) -> dict:
    """{'lo', 'hi', 'counts'}: `bins` equal bins from min(0, lowest) to the highest of an atom's
    coefficients on the tokens using it (no counts when it is unused)."""
    if not len(values):
        return {"lo": 0.0, "hi": 0.0, "counts": []}
    lo, hi = min(0.0, float(values.min())), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    return {"lo": round(lo, 4), "hi": round(hi, 4), "counts": [int(c) for c in counts]}


def logit_cards(effects, tokenizer) -> list[dict]:
    """Per direction {'up': [[token, change], ...], 'down': [...]} from itda.explorer.logits.LogitEffects,
    each token id decoded as the text it stands for."""
    ids = sorted({int(i) for t in (effects.promoted_MK, effects.suppressed_MK) for i in t.reshape(-1).tolist()})
    text = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True))

    def pairs(ids_K, values_K) -> list:
        return [[text[int(i)], round(float(v), 3)] for i, v in zip(ids_K.tolist(), values_K.tolist(), strict=True)]

    return [
        {
            "up": pairs(effects.promoted_MK[m], effects.promoted_value_MK[m]),
            "down": pairs(effects.suppressed_MK[m], effects.suppressed_value_MK[m]),
        }
        for m in range(len(effects.promoted_MK))
    ]


def shared_atoms(a: Dictionary, b: Dictionary) -> list[list[int]]:
    """Pairs [i, j] of atoms of a and b taken from the same token (document, character span)."""

    def key(refs) -> dict[tuple[int, int, int], int]:
        return {(int(r[0]), int(r[2]), int(r[3])): i for i, r in enumerate(refs.tolist()) if r[0] >= 0 and r[2] >= 0}

    ka, kb = key(a.refs), key(b.refs)
    return sorted([[ka[k], kb[k]] for k in ka.keys() & kb.keys()])
