"""Every comparison measure by name: its kind, what it needs, how it streams, and what else it yields.

Adding a measure = its function + one entry in REGISTRY. The CLI's --measures help and
validation (`check_measures`), the pipeline's choice of estimators (`itda.comparison.plan`) and
the benchmarks read this table; nothing else lists measure names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from itda.errors import ItdaInputError

# kinds: how a comparison computes the measure
DICTIONARY = "dictionary"  # from the per-layer ITDA dictionaries alone (jaccard)
STREAMED = "streamed"  # the exact streaming CKA grid over every paired token (minibatch CKA past cka_memory)
KEPT_ROWS = "kept_rows"  # per layer pair on the first max_rows paired rows (similarity_grid)
ITDA_KEPT_ROWS = "itda_kept_rows"  # ITDA dictionaries fitted on the kept rows (itda_grids)
PER_TOKEN = "per_token"  # every paired token, second pass over centred dictionaries (PerTokenGrid)

# needs
ACTIVATIONS = "activations"
DICTIONARIES = "dictionaries"
SECOND_PASS = "second_pass"


@dataclass(frozen=True)
class MeasureSpec:
    """One measure: what `itda compare` needs to compute it and what it reports."""

    name: str
    kind: str
    doc: str  # one line
    needs: frozenset[str]
    streams: str  # how it sees the corpus
    also_yields: tuple[str, ...] = ()  # measures asked for alongside it by `itda compare` (cka -> cka_debiased)
    exact_only: bool = False  # not computed when its CKA grid falls back to minibatch
    default: bool = False  # in `itda compare`'s default --measures


_ALL_TOKENS = "exact float64 sums over every paired token (minibatch CKA past --cka-memory)"
_KEPT = "the first --max-rows paired rows"
_SECOND = "every paired token, second pass over dictionaries of centred rows, leave-one-out"
_ACTS = frozenset({ACTIVATIONS})
_ITDA = frozenset({ACTIVATIONS, DICTIONARIES})
_ITDA_2 = frozenset({ACTIVATIONS, DICTIONARIES, SECOND_PASS})


REGISTRY: dict[str, MeasureSpec] = {
    s.name: s
    for s in (
        MeasureSpec(
            "jaccard",
            DICTIONARY,
            "Jaccard index of the layers' ITDA atoms (raw, crop, chance; model union)",
            frozenset({DICTIONARIES}),
            "one ITDA dictionary per layer built over every token",
            default=True,
        ),
        MeasureSpec(
            "itda_fused",
            PER_TOKEN,
            "CSLS of z(itda_scaled_cka) + z(itda_scaled_procrustes) + z(norm profile)",
            _ITDA_2,
            _SECOND,
            default=True,
        ),
        MeasureSpec(
            "itda_scaled_procrustes",
            PER_TOKEN,
            "Procrustes between reconstructions scaled by ||x_t - mu||",
            _ITDA_2,
            _SECOND,
            exact_only=True,
        ),
        MeasureSpec(
            "itda_scaled_cka", PER_TOKEN, "linear CKA between reconstructions scaled by ||x_t - mu||", _ITDA_2, _SECOND
        ),
        MeasureSpec(
            "itda_loss_profile", PER_TOKEN, "Spearman correlation across tokens of the MP losses", _ITDA_2, _SECOND
        ),
        MeasureSpec(
            "itda_recon_cka", PER_TOKEN, "linear CKA between unit ITDA reconstructions", _ITDA_2, _SECOND, default=True
        ),
        MeasureSpec(
            "itda_relative", ITDA_KEPT_ROWS, "relative representations over the shared ITDA anchors", _ITDA, _KEPT
        ),
        MeasureSpec(
            "itda_code_overlap", ITDA_KEPT_ROWS, "Jaccard of the atoms used over the shared anchors", _ITDA, _KEPT
        ),
        MeasureSpec("itda_code_cosine", ITDA_KEPT_ROWS, "cosine of the MP codes over the shared anchors", _ITDA, _KEPT),
        MeasureSpec(
            "itda_cross_recon", ITDA_KEPT_ROWS, "reconstruction over the other layer's atom positions", _ITDA, _KEPT
        ),
        MeasureSpec(
            "cka",
            STREAMED,
            "linear CKA, biased (Kornblith et al. 2019)",
            _ACTS,
            _ALL_TOKENS,
            also_yields=("cka_debiased",),
            default=True,
        ),
        MeasureSpec(
            "cka_debiased", STREAMED, "linear CKA with the unbiased HSIC (Song et al. 2012)", _ACTS, _ALL_TOKENS
        ),
        MeasureSpec(
            "procrustes",
            STREAMED,
            "orthogonal Procrustes similarity (Williams et al. 2021)",
            _ACTS,
            _ALL_TOKENS,
            exact_only=True,
            default=True,
        ),
        MeasureSpec("cka_rbf", KEPT_ROWS, "CKA with Gaussian kernels (median bandwidth)", _ACTS, _KEPT),
        MeasureSpec("svcca", KEPT_ROWS, "SVCCA (Raghu et al. 2017)", _ACTS, _KEPT, default=True),
        MeasureSpec("pwcca", KEPT_ROWS, "PWCCA (Morcos et al. 2018)", _ACTS, _KEPT),
        MeasureSpec(
            "relative",
            KEPT_ROWS,
            "relative representations over random anchors (Moschella et al. 2023)",
            _ACTS,
            _KEPT,
            default=True,
        ),
        MeasureSpec("mutual_knn", KEPT_ROWS, "mutual k-NN alignment (Huh et al. 2024)", _ACTS, _KEPT),
    )
}


def names_of(*kinds: str) -> tuple[str, ...]:
    """The registered names of these kinds, in registry order."""
    return tuple(name for name, spec in REGISTRY.items() if spec.kind in kinds)


DEFAULT_MEASURES = tuple(name for name, spec in REGISTRY.items() if spec.default)


def check_measures(measures: Sequence[str]) -> None:
    """Raise ItdaInputError naming every measure that is not registered."""
    unknown = set(measures) - set(REGISTRY)
    if unknown:
        raise ItdaInputError(f"unknown measures: {', '.join(sorted(unknown))} (known: {', '.join(REGISTRY)})")


def expand_measures(measures: Sequence[str]) -> list[str]:
    """The measures with what each also yields (cka -> cka, cka_debiased), duplicates dropped, in order."""
    out: list[str] = []
    for name in measures:
        out.extend([name, *REGISTRY[name].also_yields] if name in REGISTRY else [name])
    return list(dict.fromkeys(out))


def measures_help() -> str:
    """The --measures help line: every registered name."""
    return f"Comma list: {', '.join(REGISTRY)}."
