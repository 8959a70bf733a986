"""What a user chooses about the model and the corpus activations are read from (defaults and help).

The CLI's model and corpus options (itda build, itda sae train, and the shared ones of eval,
explore and select) are built from these fields: see itda.cli.options.
"""

from __future__ import annotations

from dataclasses import dataclass

from itda.activations.corpus import DEFAULT_CONTEXT
from itda.activations.stream import STREAM_DTYPES
from itda.configfields import FieldError, choice


@dataclass(frozen=True)
class ModelSource:
    """The model activations come from, and how it runs."""

    model: str | None = choice(None, "Model: packaged name, .gguf file or folder.")
    device: str = choice("cpu", "torch device (cpu, cuda, cuda:1).")
    model_dtype: str = choice("float32", "Model input: dtype the model computes in (bfloat16 for large models on GPU).")
    layerwise: bool | None = choice(
        None, "Model input: stream blocks from the safetensors shards (default: when the model exceeds --max-memory)."
    )
    max_memory: int | None = choice(
        None,
        "Model input: memory budget for choosing layer-wise execution, e.g. 8GB, 70GiB, 0.5 (GiB) "
        "(default: half the free memory).",
    )

    def validate(self) -> None:
        if self.model_dtype not in STREAM_DTYPES:
            raise FieldError("model_dtype", f"must be one of {', '.join(STREAM_DTYPES)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise FieldError("max_memory", f"must be > 0, got {self.max_memory}")


@dataclass(frozen=True)
class CorpusConfig:
    """The text a model reads, and how its activations are batched and stored."""

    corpus: str = choice("default", "Model input: .txt, folder of .txt, .jsonl, .parquet, saved dataset, or 'default'.")
    field: str = choice("text", "Model input: JSONL/Parquet/dataset text field.")
    tokens: int = choice(100_000, "Model input: tokens to build from.")
    context: int = choice(DEFAULT_CONTEXT, "Model input: tokens per context.")
    batch_tokens: int = choice(4096, "Model input: tokens per forward pass.")
    include_special: bool = choice(False, "Model input: let BOS/special tokens become atoms.")
    stream_dtype: str = choice("float16", "Model input: float16, bfloat16 or float32.")

    def validate(self) -> None:
        for name in ("tokens", "context", "batch_tokens"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.stream_dtype not in STREAM_DTYPES:
            raise FieldError("stream_dtype", f"must be one of {', '.join(STREAM_DTYPES)}")

    @property
    def batch_contexts(self) -> int:
        """Contexts per forward pass (at least one)."""
        return max(1, self.batch_tokens // self.context)
