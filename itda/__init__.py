"""itda: Inference-Time Decomposition of Activations."""

__version__ = "0.1.0"

from itda.builder import BatchStats, BuildConfig, DictionaryBuilder, build_dictionary  # noqa: E402
from itda.dictionary import Dictionary, DictionaryMeta  # noqa: E402
from itda.evaluation import EvalReport, evaluate  # noqa: E402
from itda.pursuit import SparseCodes, matching_pursuit, orthogonal_matching_pursuit  # noqa: E402

__all__ = [
    "BatchStats",
    "BuildConfig",
    "Dictionary",
    "DictionaryBuilder",
    "DictionaryMeta",
    "EvalReport",
    "SparseCodes",
    "build_dictionary",
    "evaluate",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
]
