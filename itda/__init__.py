"""itda: Inference-Time Decomposition of Activations."""

from itda.api import build, compare, evaluate, explore, export, load_model, select, train_sae, train_saes  # noqa: E402,F811
from itda.builder import BatchStats, BuildConfig, DictionaryBuilder, build_dictionary  # noqa: E402
from itda.comparison import CompareConfig, ModelComparison  # noqa: E402
from itda.dictionary import Dictionary, DictionaryMeta  # noqa: E402
from itda.evaluation import EvalReport  # noqa: E402
from itda.pursuit import SparseCodes, matching_pursuit, orthogonal_matching_pursuit  # noqa: E402
from itda.version import __version__  # noqa: E402,F401

__all__ = [
    "build",
    "compare",
    "evaluate",
    "explore",
    "export",
    "load_model",
    "select",
    "train_sae",
    "train_saes",
    "BatchStats",
    "CompareConfig",
    "ModelComparison",
    "BuildConfig",
    "Dictionary",
    "DictionaryBuilder",
    "DictionaryMeta",
    "EvalReport",
    "SparseCodes",
    "build_dictionary",
    "matching_pursuit",
    "orthogonal_matching_pursuit",
]
