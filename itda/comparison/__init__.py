"""Comparing layers and models: Jaccard over ITDA atoms and the usual representation measures."""

from itda.comparison.cka import linear_cka
from itda.comparison.jaccard import jaccard, jaccard_union
from itda.comparison.layers import argmax_accuracy, monotone_correspondence, pooled_accuracy
from itda.comparison.measures import (
    MEASURES,
    compare_activations,
    compare_stream,
    mutual_knn,
    pwcca,
    rbf_cka,
    relative_similarity,
    similarity_grid,
    svcca,
)
from itda.comparison.model_comparison import ModelComparison
from itda.comparison.pipeline import compare_models, compare_on_corpus
from itda.comparison.plan import CompareConfig, ComparePlan
from itda.comparison.registry import REGISTRY, MeasureSpec, check_measures
from itda.comparison.result import Similarity
from itda.comparison.streaming import StreamingCKA, StreamingCKAGrid

__all__ = [
    "MEASURES",
    "REGISTRY",
    "CompareConfig",
    "ComparePlan",
    "MeasureSpec",
    "ModelComparison",
    "Similarity",
    "StreamingCKA",
    "StreamingCKAGrid",
    "argmax_accuracy",
    "check_measures",
    "compare_activations",
    "compare_models",
    "compare_on_corpus",
    "compare_stream",
    "jaccard",
    "jaccard_union",
    "linear_cka",
    "monotone_correspondence",
    "mutual_knn",
    "pooled_accuracy",
    "pwcca",
    "rbf_cka",
    "relative_similarity",
    "similarity_grid",
    "svcca",
]
