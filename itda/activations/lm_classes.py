"""Which transformers classes are causal LMs (shared by the in-memory and the layer-wise loaders)."""

from __future__ import annotations


def is_causal_lm_class(name: str) -> bool:
    """Whether a transformers class name is a causal LM with an LM head (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
