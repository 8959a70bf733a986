"""What a user chooses about the model and the corpus activations are read from (defaults and help).

The CLI's model and corpus options (itda build, itda sae train, and the shared ones of eval,
explore and select) are built from these fields: see itda.cli.options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from itda.activations.corpus import DEFAULT_CONTEXT
from itda.activations.hub_datasets import dataset_spec
from itda.activations.stream import STREAM_DTYPES
from itda.configfields import FieldError, choice
from itda.devices import MODEL_DTYPES, choose_device, choose_model_dtype


@dataclass(frozen=True)
class ModelSource:
    """The model activations come from, and how it runs."""

    model: str | None = choice(None, "Model: packaged name, .gguf file, folder or Hugging Face hub ID (org/name).")
    device: str = choice("auto", "torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1.")
    model_dtype: str = choice(
        "auto", "Model input: dtype the model computes in: auto (bfloat16 on CUDA, float32 on CPU), float32, ..."
    )
    layerwise: bool | None = choice(
        None, "Model input: stream blocks from the safetensors shards (default: when the model exceeds --max-memory)."
    )
    max_memory: int | None = choice(
        None,
        "Model input: memory budget for choosing layer-wise execution, e.g. 8GB, 70GiB, 0.5 (GiB) "
        "(default: half the free memory).",
    )
    revision: str | None = choice(None, "Hub models: branch, tag or commit (default: main).")
    offline: bool = choice(False, "Hub models: use the Hugging Face cache only, never the network.")

    def validate(self) -> None:
        if self.model_dtype != "auto" and self.model_dtype not in MODEL_DTYPES:
            raise FieldError("model_dtype", f"must be auto or one of {', '.join(MODEL_DTYPES)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise FieldError("max_memory", f"must be > 0, got {self.max_memory}")
        choose_device(self.device)

    def load(self, max_layer: int | None = None):
        """The model (an itda.activations.models.LoadedModel) on the chosen device and dtype; max_layer: the
        deepest block a layer-wise run needs."""
        from itda.activations.models import load_model

        if self.model is None:
            raise FieldError("model", "no model given")
        self.validate()
        return load_model(
            self.model,
            device=self.torch_device(),
            dtype=self.torch_dtype(),
            revision=self.revision,
            offline=self.offline,
            layerwise=self.layerwise,
            max_memory=self.max_memory,
            max_layer=max_layer,
        )

    def torch_device(self) -> torch.device:
        """The device chosen (auto: CUDA when available)."""
        return choose_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """The model dtype chosen for the chosen device (auto: bfloat16 on CUDA, float32 on CPU)."""
        return choose_model_dtype(self.model_dtype, self.torch_device())


@dataclass(frozen=True)
class CorpusConfig:
    """The text a model reads, and how its activations are batched and stored."""

    corpus: str = choice(
        "default",
        "Model input: .txt, folder of .txt, .jsonl, .parquet, saved dataset, Hugging Face dataset ID (org/name, "
        "streamed) or 'default'.",
    )
    field: str = choice("text", "Model input: JSONL/Parquet/dataset text field.")
    split: str = choice("train", "Model input: split of a Hugging Face dataset.")
    dataset_config: str | None = choice(None, "Model input: config (subset) name of a Hugging Face dataset.")
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
    def source(self) -> str:
        """The corpus string read and recorded: a dataset's split and config included ('org/name:config:split')."""
        return dataset_spec(self.corpus, self.split, self.dataset_config)

    @property
    def batch_contexts(self) -> int:
        """Contexts per forward pass (at least one)."""
        return max(1, self.batch_tokens // self.context)
