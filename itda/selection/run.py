"""`itda select`: supports of a corpus under a dictionary, a chosen subset, and its coverage report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from itda.activations.corpus import read_documents
from itda.activations.models import model_at_hookpoint
from itda.configfields import FieldError
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.selection.coverage import coverage_curve, longest_order, random_order, select_documents
from itda.selection.supports import DocSupports, document_supports

RANDOM_DRAWS = 5


class Selection(NamedTuple):
    chosen: np.ndarray  # corpus indices of the chosen documents, in order of choice
    new_atoms: np.ndarray  # atoms each choice newly covered
    report: dict
    curves: dict[str, np.ndarray]  # strategy -> atoms covered after 1..budget documents
    tokens: np.ndarray  # tokens of each chosen document
    texts: tuple[str, ...] = ()  # the chosen documents' text (itda.select; choose() has no texts)


def corpus_supports(
    corpus: str,
    dictionary: Dictionary,
    *,
    model: str | None = None,
    field: str = "text",
    k: int | None = None,
    support_atoms: int = 4,
    context: int = 128,
    max_doc_tokens: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> tuple[Sequence[str], DocSupports]:
    lm, hp = model_at_hookpoint(dictionary, model, needs="select", device=device)
    device = lm.device
    docs = read_documents(corpus, field)
    sup = document_supports(
        lm,
        dictionary,
        hp,
        docs,
        list(range(len(docs))),
        k=dictionary.encoding_k(k),
        support_atoms=support_atoms,
        context=context,
        max_doc_tokens=max_doc_tokens,
        device=device,
        progress=progress,
    )
    if int(np.asarray(sup.tokens).sum()) == 0:
        raise ItdaInputError(f"{corpus}: its documents hold no tokens to select from")
    return docs, sup


def choose(sup: DocSupports, n_atoms: int, budget: int, strategy: str = "greedy", *, seed: int = 0) -> Selection:
    """The chosen documents and a report of atom coverage against random and longest-first choices."""
    if budget < 1:
        raise FieldError("budget", f"must be >= 1, got {budget}")
    if budget > len(sup.doc_ids):
        raise FieldError("budget", f"{budget} exceeds the corpus's {len(sup.doc_ids)} documents")
    rows = select_documents(sup.sets, budget, strategy, doc_tokens=sup.tokens, seed=seed)
    longest = longest_order(sup.tokens, budget)
    draws = np.stack(
        [coverage_curve(sup.sets, random_order(len(sup.doc_ids), budget, seed + i)) for i in range(RANDOM_DRAWS)]
    )
    chosen = coverage_curve(sup.sets, rows)
    # the baselines, then the choice (under its own name when it is one of them: its own curve)
    curves = {"random": draws.mean(0), "longest": coverage_curve(sup.sets, longest), strategy: chosen}
    used = int((np.asarray(sup.sets.sum(0)).ravel() > 0).sum())
    final = {name: float(c[len(rows) - 1]) if len(c) else 0.0 for name, c in curves.items()}
    report = {
        "itda_select": 1,
        "strategy": strategy,
        "budget": budget,
        "chosen": int(len(rows)),
        "documents": int(len(sup.doc_ids)),
        "corpus_tokens": int(sup.tokens.sum()),
        "atoms_in_dictionary": int(n_atoms),
        "atoms_used_by_corpus": used,
        "coverage": {
            name: {"atoms": v, "of_corpus": v / used if used else 0.0, "of_dictionary": v / n_atoms}
            for name, v in final.items()
        },
        "tokens": {"longest": int(sup.tokens[longest].sum()), strategy: int(sup.tokens[rows].sum())},
        "random_draws": RANDOM_DRAWS,
        "random_std_atoms": float(draws[:, -1].std()),
        "seed": seed,
    }
    new = np.diff(np.concatenate([[0], chosen]))
    return Selection(sup.doc_ids[rows], new, report, curves, np.asarray(sup.tokens)[rows])


def plot_curves(curves: dict[str, np.ndarray], used: int, path, title: str) -> bool:
    """Coverage curves as a PNG (False when matplotlib is missing)."""
    from itda.comparison.report import has_matplotlib

    if not has_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from itda.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(
            np.arange(1, len(c) + 1),
            np.asarray(c) / max(used, 1),
            label=name,
            lw=2 if name not in ("random", "longest") else 1.2,
        )
    ax.set_xlabel("documents chosen")
    ax.set_ylabel("share of the corpus's atoms covered")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True
