"""Compare two models layer by layer over a shared corpus: a plan, one or two passes, a result.

Both models read the same documents (`itda.comparison.pairing`: tokens paired by position or by
char_end). `make_plan` decides the estimators up front from the measure registry and the models'
shapes (`itda.comparison.plan`); pass 1 feeds the CKA grid, the kept rows and the dictionaries,
pass 2 (per-token ITDA measures only) encodes every paired token over centred dictionaries
(`itda.comparison.passes`); the matrices are assembled at the end. Under torchrun everything
across ranks goes through `itda.comparison.ranks`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

import numpy as np

from itda.activations.models import LoadedModel
from itda.comparison.jaccard import SIZE_CONTROLS, jaccard, jaccard_union
from itda.comparison.model_comparison import ModelComparison
from itda.comparison.pairing import PairedCorpus, pair_corpus
from itda.comparison.passes import FirstPass, first_pass, kept_row_matrices, second_pass, take_dictionaries
from itda.comparison.per_token import PerTokenGrid
from itda.comparison.plan import CompareConfig, ComparePlan, make_plan
from itda.comparison.ranks import Ranks
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError


def compare_on_corpus(
    lm_a: LoadedModel,
    lm_b: LoadedModel | None,
    corpus: str = "default",
    field: str = "text",
    config: CompareConfig | None = None,
    *,
    progress: bool = True,
    exchange=None,
) -> ModelComparison:
    """compare_models over a corpus by name (what `itda compare A B` and itda.compare run): the
    default corpus's held-out split, another corpus whole."""
    from itda.activations.corpus import iter_split, read_documents

    docs = read_documents(corpus, field)
    ids = iter_split(docs, "heldout" if corpus == "default" else "all")  # a streamed corpus: read as needed
    return compare_models(lm_a, lm_b, docs, ids, config, progress=progress, exchange=exchange)


def compare_models(
    lm_a: LoadedModel,
    lm_b: LoadedModel | None,
    docs: Sequence[str],
    doc_ids: Iterable[int],
    config: CompareConfig | None = None,
    *,
    progress: bool = True,
    exchange=None,
    interleave: int = 1,
    **options,
) -> ModelComparison:
    """Similarity matrices [L_A, L_B] for each measure of `config`; lm_b=None compares lm_a with itself.

    options: CompareConfig fields overriding `config` (compare_models(..., tokens=2000, measures=[...])).
    Linear CKA runs exactly (float64 streaming sums) while those accumulators fit config.cka_memory
    bytes, else as minibatch CKA (reported as cka_minibatch); the per-token ITDA grids follow the same
    rule each on its own. `result.plan` holds the estimators, `result.notes` says which ran.

    exchange (itda.builder.distributed.Exchange, under torchrun): rank r forwards the document chunks
    r, r + W, ...; rank 0 gets the full result, the other ranks an empty one. One process with
    interleave=W gives the same result (CKA up to float64 summation order; minibatch CKA differs,
    its minibatches being per rank).
    """
    config = dataclasses.replace(config or CompareConfig(), **options)
    t0 = time.perf_counter()
    corpus = pair_corpus(
        lm_a, lm_b, docs, doc_ids, tokens=config.tokens, context=config.context, batch_tokens=config.batch_tokens
    )
    plan = make_plan(config, *corpus.shapes)
    ranks = Ranks(exchange, interleave)
    first = first_pass(corpus, plan, ranks, progress)
    if first.paired < 4:
        raise ItdaInputError(f"only {first.paired} tokens could be paired between the models")
    dicts_a = dicts_b = None
    if first.jaccard_a is not None and ranks.is_root:
        assert first.jaccard_b is not None  # made together with jaccard_a
        dicts_a = take_dictionaries(first.jaccard_a)  # a self-comparison's jaccard_b is this list
        dicts_b = dicts_a if corpus.self_compare else take_dictionaries(first.jaccard_b)
    first.jaccard_a = first.jaccard_b = None  # their dictionaries are taken: the builders' memory goes
    per_token = second_pass(corpus, plan, ranks, first, progress) if plan.second_pass else None
    result = ModelComparison(
        corpus.lm_a.name,
        corpus.lm_b.name,
        len(corpus.hps_a),
        len(corpus.hps_b),
        {},
        first.paired,
        corpus.identity,
        0.0,
        notes=plan.notes(),
        plan=plan,
    )
    if ranks.is_root:  # the other ranks' part is done; rank 0 reports
        result.matrices = assemble_matrices(corpus, plan, first, per_token)
        _add_dictionaries(result, dicts_a, dicts_b, per_token)
    result.seconds = time.perf_counter() - t0
    return result


def assemble_matrices(
    corpus: PairedCorpus, plan: ComparePlan, first: FirstPass, per_token: PerTokenGrid | None
) -> dict[str, np.ndarray]:
    """Every planned measure's [L_A, L_B] matrix from the passes' accumulators (Jaccard aside)."""
    cfg, matrices = plan.config, {}
    if first.grid is not None:
        mats = first.grid.matrices(procrustes="procrustes" in cfg.measures)
        assert plan.raw_grid is not None  # first.grid is made from it
        if plan.raw_grid.exact:
            matrices.update({m: mats[m] for m in plan.streamed})
        else:
            matrices["cka_minibatch"] = mats["cka"]
    kept = first.kept_matrices
    if kept is None and plan.keeps_rows:
        kept = kept_row_matrices(plan, first.kept, corpus.self_compare)
    kept = kept or {}
    matrices.update({m: kept[m] for m in plan.kept_rows})
    if per_token is not None:
        matrices.update(per_token.matrices())
    matrices.update({m: v for m, v in kept.items() if m not in plan.kept_rows})
    return matrices


def _add_dictionaries(result: ModelComparison, dicts_a, dicts_b, per_token: PerTokenGrid | None) -> None:
    """The Jaccard dictionaries and matrices, and the per-token basis, into the result."""
    if per_token is not None:
        result.per_token_basis_a, result.per_token_basis_b = per_token.basis_a, per_token.basis_b
    if dicts_a is not None:
        result.dictionaries_a, result.dictionaries_b = dicts_a, dicts_b
        result.matrices.update(jaccard_matrices(dicts_a, dicts_b))
        result.model_level["jaccard_model"] = jaccard_union(dicts_a, dicts_b).value


def jaccard_matrices(dicts_a: list[Dictionary], dicts_b: list[Dictionary]) -> dict[str, np.ndarray]:
    """jaccard_raw / jaccard_crop / jaccard_chance matrices [L_A, L_B]."""
    out = {}
    for size in SIZE_CONTROLS:
        out[f"jaccard_{size}"] = np.array([[jaccard(a, b, size=size).value for b in dicts_b] for a in dicts_a])
    return out
