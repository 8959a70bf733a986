"""Jaccard similarity of ITDA dictionaries over atom identities (which tokens became atoms).

Identities:
  token  (document index, token position): the paper's; needs the same dataset fingerprint
         (same documents, tokenizer and context packing).
  char   (document index, char_end): tokens that end at the same character have read the same
         text, so models with different tokenizers can be compared on the same documents.
Size control (dictionaries of different sizes bias the raw index toward the larger one):
  raw    |A & B| / |A | B|
  crop   both cropped to the smaller size, in order of addition (as a maximum dictionary size would)
  chance (J - J0) / (1 - J0) with J0 the index that random atom sets of these sizes would get
         among the T tokens seen (expected overlap |A||B|/T)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from itda.comparison.result import Similarity
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError

IDENTITIES = ("auto", "token", "char")
SIZE_CONTROLS = ("raw", "crop", "chance")


def atom_keys(d: Dictionary, identity: str, limit: int | None = None) -> np.ndarray:
    """int64 keys doc * 2^32 + (pos | char_end) of the first `limit` atoms with known references."""
    refs = d.refs[:limit].numpy()
    col = 1 if identity == "token" else 3
    known = (refs[:, 0] >= 0) & (refs[:, col] >= 0)
    if not known.all():
        raise ItdaInputError(
            f"{int((~known).sum())} atoms have no {'token position' if col == 1 else 'character'} reference"
        )
    return ref_keys(d.refs[:limit], identity)


def ref_keys(refs_N5: torch.Tensor, identity: str) -> np.ndarray:
    """int64 keys doc * 2^32 + (pos if identity == 'token' else char_end) of rows of refs."""
    r = refs_N5.numpy()
    col = 1 if identity == "token" else 3
    return r[:, 0].astype(np.int64) * (1 << 32) + r[:, col].astype(np.int64)


def resolve_identity(a: Dictionary, b: Dictionary, identity: str) -> str:
    if identity not in IDENTITIES:
        raise ItdaInputError(f"unknown identity {identity!r}; choose one of {', '.join(IDENTITIES)}")
    same_data = a.meta.dataset_fingerprint and a.meta.dataset_fingerprint == b.meta.dataset_fingerprint
    if identity == "auto":
        identity = "token" if same_data else "char"
    if identity == "token" and not same_data:
        raise ItdaInputError(
            "token identities need dictionaries built on the same documents with the same tokenizer and packing "
            f"(dataset fingerprints {a.meta.dataset_fingerprint} vs {b.meta.dataset_fingerprint}); use identity 'char'"
        )
    if identity == "char":
        da, db = a.meta.build.get("documents_fingerprint"), b.meta.build.get("documents_fingerprint")
        if not da or not db or da != db:
            raise ItdaInputError(
                f"character identities need dictionaries built on the same documents (fingerprints {da} vs {db})"
            )
    return identity


def _tokens_seen(a: Dictionary, b: Dictionary, tokens: int | None) -> int:
    if tokens:
        return tokens
    ta, tb = a.meta.build.get("tokens"), b.meta.build.get("tokens")
    if not ta or not tb:
        raise ItdaInputError("the chance-corrected index needs the number of tokens seen (not recorded; pass tokens=)")
    return max(int(ta), int(tb))


def jaccard_keys(ka: np.ndarray, kb: np.ndarray) -> tuple[float, int, int]:
    sa, sb = np.unique(ka), np.unique(kb)
    inter = int(np.intersect1d(sa, sb, assume_unique=True).size)
    union = sa.size + sb.size - inter
    return (inter / union if union else float("nan")), inter, union


def jaccard(
    a: Dictionary, b: Dictionary, *, identity: str = "auto", size: str = "raw", tokens: int | None = None
) -> Similarity:
    """Jaccard index of the two dictionaries' atom identities."""
    if size not in SIZE_CONTROLS:
        raise ItdaInputError(f"unknown size control {size!r}; choose one of {', '.join(SIZE_CONTROLS)}")
    identity = resolve_identity(a, b, identity)
    limit = min(len(a), len(b)) if size == "crop" else None
    ka, kb = atom_keys(a, identity, limit), atom_keys(b, identity, limit)
    value, inter, union = jaccard_keys(ka, kb)
    details = {"identity": identity, "size": size, "n_a": int(ka.size), "n_b": int(kb.size), "intersection": inter}
    if size == "chance":
        t = _tokens_seen(a, b, tokens)
        expected = ka.size * kb.size / t
        j0 = expected / (ka.size + kb.size - expected)
        value = (value - j0) / (1 - j0)
        details.update(tokens=t, chance_index=j0)
    return Similarity(f"jaccard_{size}", float(value), details)


def jaccard_union(
    dicts_a: Sequence[Dictionary], dicts_b: Sequence[Dictionary], *, identity: str = "auto"
) -> Similarity:
    """Model-level similarity: Jaccard of the unions of each model's per-layer atom identities."""
    if not dicts_a or not dicts_b:
        raise ItdaInputError("model-level Jaccard needs at least one dictionary per model")
    identity = resolve_identity(dicts_a[0], dicts_b[0], identity)
    ka = np.concatenate([atom_keys(d, identity) for d in dicts_a])
    kb = np.concatenate([atom_keys(d, identity) for d in dicts_b])
    value, inter, union = jaccard_keys(ka, kb)
    return Similarity(
        "jaccard_model",
        value,
        {
            "identity": identity,
            "layers_a": len(dicts_a),
            "layers_b": len(dicts_b),
            "intersection": inter,
            "union": union,
        },
    )
