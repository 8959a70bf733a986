"""safetensors files with a JSON header entry: how every itda artifact and checkpoint is stored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from itda.atomic import atomic_path
from itda.errors import ItdaInputError


def read_tensor_file(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors); an unreadable file raises ItdaInputError naming it and `what` it should be."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        return header, load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ItdaInputError(f"{path}: not a readable {what} ({str(exc).splitlines()[0]})") from None


def json_entry(header: dict[str, str], key: str, path: str | os.PathLike, what: str) -> dict:
    """The JSON object stored under `key` in the header."""
    try:
        value = json.loads(header[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ItdaInputError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ItdaInputError(f"{path}: not a readable {what} (header entry '{key}' is not an object)")
    return value


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str, entry: dict) -> None:
    """Write tensors with `entry` as JSON under `key`, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={key: json.dumps(entry, sort_keys=True)})
