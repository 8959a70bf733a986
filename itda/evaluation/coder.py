"""What evaluation on a model needs of a coder (a dictionary or an SAE), as a Protocol.

`as_coder(obj, k, method)` gives the ModelCoder of an object: itself when it already is one, a
DictionaryCoder for a Dictionary, and whatever other packages register (itda.sae registers its
LoadedSae), so that evaluation never imports them.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, runtime_checkable

import torch

from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.evaluation.report import Evaluator


class StreamEvaluator(Protocol):
    """Accumulates metrics: update(x [B, d]) per batch, then report() (an object with summary() and tokens)."""

    def update(self, x_BD: torch.Tensor) -> None: ...

    def report(self) -> Any: ...


@runtime_checkable
class ModelCoder(Protocol):
    """A dictionary or SAE as evaluation on a model sees it."""

    what: str  # "dictionary" or "SAE", for messages
    meta: Any  # records model, hookpoint, tokenizer
    d: int  # activation dimension
    include_special: bool  # whether BOS/special tokens are encoded too

    def evaluator(self) -> StreamEvaluator: ...

    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor: ...


class DictionaryCoder:
    """A Dictionary as a ModelCoder, encoding with k atoms (None: its own k) by `method` (mp or omp)."""

    what = "dictionary"

    def __init__(self, dictionary: Dictionary, k: int | None = None, method: str = "mp"):
        self.dictionary, self.k, self.method = dictionary, k, method
        self.meta = dictionary.meta
        self.d = dictionary.d
        self.include_special = bool(dictionary.meta.build.get("include_special", False))

    def evaluator(self) -> Evaluator:
        return Evaluator(self.dictionary, self.k, self.method)

    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        return self.dictionary.reconstruct(x, k)


@functools.singledispatch
def as_coder(obj, k: int | None = None, method: str = "mp") -> ModelCoder:
    """obj as a ModelCoder (k and method apply to dictionaries)."""
    if isinstance(obj, ModelCoder):
        return obj
    raise ItdaInputError(f"cannot evaluate a {type(obj).__name__}: give a Dictionary, an SAE or a ModelCoder")


@as_coder.register
def _(obj: Dictionary, k: int | None = None, method: str = "mp") -> ModelCoder:
    return DictionaryCoder(obj, k, method)
