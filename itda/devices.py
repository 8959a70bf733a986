"""Where and in what precision a run computes: 'auto' means CUDA (bfloat16) when present, else CPU (float32)."""

from __future__ import annotations

import torch

from itda.configfields import FieldError

MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def choose_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device `spec` names ('auto' or None: cuda when available, else cpu), refused in one line
    (FieldError on 'device') when it is unknown or not present on this machine."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise FieldError("device", f"{spec!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FieldError("device", f"{spec}: CUDA is not available in this torch build or on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FieldError("device", f"{spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise FieldError("device", f"{spec}: itda runs on cpu or cuda")
    return dev


def choose_model_dtype(spec: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype a model computes in: `spec` by name, or for 'auto'/None bfloat16 on a CUDA device that
    supports it (else float16 there) and float32 elsewhere."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec is None or spec == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in MODEL_DTYPES:
        raise FieldError("model_dtype", f"must be auto or one of {', '.join(MODEL_DTYPES)}, got {spec!r}")
    return MODEL_DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the names MODEL_DTYPES uses)."""
    return str(dtype).removeprefix("torch.")


def describe(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'cuda:0 (NVIDIA H200), bfloat16' or 'cpu, float32': what a run header prints of its choice."""
    where = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        where = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return where if dtype is None else f"{where}, {dtype_name(dtype)}"
