"""Direct logit effects of directions (atoms, SAE decoder rows), as SAE dashboards show them.

A direction u moves the logits, through the model's own final norm and unembedding, by
head(norm(u)) - head(norm(0)): the bias terms (a LayerNorm's beta, an LM head's bias) cancel, so
only what u adds is left. For an RMSNorm this is W_U (gamma * u) / rms(u), the product SAE-Dashboard
and Neuronpedia rank tokens by (up to the positive factor 1 / rms(u), which orders nothing). Only
for causal LMs (a model with an output embedding and a final norm).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm")
BLOCK = 256  # directions through the head at a time ([BLOCK, vocab] logits)


class LogitEffects(NamedTuple):
    """Per direction, the `top` most promoted and most suppressed token ids and their logit changes."""

    promoted_MK: torch.Tensor  # int64 token ids, largest change first
    promoted_value_MK: torch.Tensor
    suppressed_MK: torch.Tensor  # int64 token ids, most negative change first
    suppressed_value_MK: torch.Tensor


def final_norm_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model's final norm and unembedding, or None when it has no LM head (encoders such as BERT)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module):
        return None
    for path in FINAL_NORMS:
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.Module):
            return module, head
    return None


@torch.no_grad()
def direct_logit_effects(model: torch.nn.Module, directions_MD: torch.Tensor, top: int = 8) -> LogitEffects | None:
    """The logit changes of each direction through `model`'s final norm and head (None: no LM head)."""
    found = final_norm_and_head(model)
    if found is None:
        return None
    norm, head = found
    weight = next(head.parameters())
    zero = torch.zeros(1, directions_MD.shape[1], dtype=weight.dtype, device=weight.device)
    base_V = head(norm(zero)).float()[0]
    parts = []
    for s in range(0, len(directions_MD), BLOCK):
        u = directions_MD[s : s + BLOCK].to(device=weight.device, dtype=weight.dtype)
        delta = head(norm(u)).float() - base_V
        k = min(top, delta.shape[1])
        hi, lo = delta.topk(k, dim=1), delta.topk(k, dim=1, largest=False)
        parts.append((hi.indices.cpu(), hi.values.cpu(), lo.indices.cpu(), lo.values.cpu()))
    if not parts:
        empty = torch.zeros(0, top)
        return LogitEffects(empty.long(), empty, empty.long(), empty)
    return LogitEffects(*(torch.cat([p[i] for p in parts]) for i in range(4)))
