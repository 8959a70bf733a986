"""Stream activations from a model: one forward pass per batch of contexts, several hookpoints.

Each token leaves as a unit direction (fp16 by default) plus its float32 norm, so residual
streams beyond the fp16 range (gemma3-270m reaches ~88,000) lose nothing; the ITDA loss and the
atoms depend only on the direction, and `ActBatch.dense()` restores the vector.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from itda.activations.corpus import Contexts
from itda.activations.hookpoints import Hookpoint, StopForward, capture
from itda.configfields import FieldError
from itda.errors import ItdaInputError

FP16_MAX = 65504.0
STREAM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ActBatch(NamedTuple):
    unit: torch.Tensor  # [T, d] unit rows in the stream dtype (zero rows stay zero)
    norm: torch.Tensor  # [T] float32 norms
    refs: torch.Tensor  # [T, 5] int64
    max_abs: float  # largest |component| before normalising

    def dense(self) -> torch.Tensor:
        """float32 activations unit * norm."""
        return self.unit.to(torch.float32) * self.norm[:, None]


def to_act_batch(x_TD: torch.Tensor, refs: torch.Tensor, dtype: torch.dtype, where: str) -> ActBatch:
    x = x_TD.to(torch.float32)
    max_abs = float(x.abs().max()) if x.numel() else 0.0  # NaN propagates through max
    if not math.isfinite(max_abs):
        raise ItdaInputError(f"the model produced NaN or inf at {where}")
    norm = x.norm(dim=1)
    unit = (x / norm.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).to(dtype)
    return ActBatch(unit, norm, refs, max_abs)


def check_contexts_fit(model: torch.nn.Module, contexts: Contexts) -> None:
    """Refuse contexts longer than the model's positions or holding ids beyond its vocabulary."""
    config = getattr(model, "config", None)
    positions = next(
        (
            getattr(config, a)
            for a in ("max_position_embeddings", "n_positions", "max_seq_len")
            if isinstance(getattr(config, a, None), int)
        ),
        None,
    )
    length = contexts.input_ids.shape[1] if contexts.input_ids.ndim == 2 else 0
    if positions is not None and length > positions:
        raise FieldError(
            "context",
            f"contexts of {length} tokens exceed the model's {positions} positions; use {{field}} {positions} or less",
        )
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and contexts.input_ids.numel():
        top, low = int(contexts.input_ids.max()), int(contexts.input_ids.min())
        if top >= vocab or low < 0:
            raise ItdaInputError(
                f"the tokenizer produced token id {top if top >= vocab else low}, outside the model's "
                f"vocabulary of {vocab}: the tokenizer does not belong to this model"
            )


def iterate_batches(
    model: torch.nn.Module,
    hookpoints: list[Hookpoint],
    contexts: Contexts,
    *,
    batch_contexts: int = 32,
    dtype: torch.dtype = torch.float16,
    include_special: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[dict[Hookpoint, ActBatch]]:
    """Yield {hookpoint: ActBatch} per batch; padding (and by default BOS/special tokens) dropped."""
    check_contexts_fit(model, contexts)
    for s in range(0, len(contexts), batch_contexts):
        e = min(s + batch_contexts, len(contexts))
        ids = contexts.input_ids[s:e].to(device)
        mask = contexts.attention_mask[s:e].to(device)
        keep = (mask > 0) if include_special else ~contexts.special[s:e].to(device)
        keep_flat = keep.reshape(-1)
        refs = contexts.refs[s:e].reshape(-1, contexts.refs.shape[-1])[keep_flat.cpu()]
        with torch.inference_mode(), capture(model, hookpoints) as store, contextlib.suppress(StopForward):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        out = {}
        for hp in hookpoints:
            acts = store[hp]
            out[hp] = to_act_batch(acts.reshape(-1, acts.shape[-1])[keep_flat], refs, dtype, hp.name)
        yield out


def iterate_dense(
    model: torch.nn.Module,
    hookpoint: Hookpoint,
    contexts: Contexts,
    *,
    batch_contexts: int = 32,
    include_special: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """float32 activations [T, d] at one hookpoint, one chunk per forward batch (for SAE training)."""
    for batch in iterate_batches(
        model,
        [hookpoint],
        contexts,
        batch_contexts=batch_contexts,
        dtype=torch.float32,
        include_special=include_special,
        device=device,
    ):
        yield batch[hookpoint].dense()
