"""safetensors files with a JSON header entry: how every itda artifact and checkpoint is stored.

Every file written here carries `itda_sha256`, a digest of its tensors (names, dtypes, shapes,
bytes), inside its JSON header entry, checked on every read: a flipped bit in the weights is
refused instead of used. The header holds that one entry only: safetensors writes several
metadata entries in an order that changes from run to run, and outputs must be byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from itda.atomic import atomic_path
from itda.errors import ItdaInputError

CHECKSUM_KEY = "itda_sha256"
# the header entry that marks each kind of itda file
ARTIFACT_KINDS = {
    "dictionary": "itda",
    "codes": "itda_codes",
    "sae": "itda_sae",
    "checkpoint": "itda_checkpoint",
    "model-checkpoint": "itda_model_checkpoint",
    "sae-checkpoint": "itda_sae_checkpoint",
}


KIND_NAMES = {
    "sae": "SAE",
    "sae-checkpoint": "SAE checkpoint",
    "sae-eval-report": "SAE eval report",
    "checkpoint": "build checkpoint",
    "model-checkpoint": "model-build checkpoint",
    "saelens-export": "SAELens export",
    "saelens-mp-export": "SAELens matching-pursuit export",
}


def kind_name(kind: str) -> str:
    """How messages name a kind of file: 'an SAE checkpoint', 'a dictionary', 'an eval report'."""
    words = KIND_NAMES.get(kind, kind.replace("-", " "))
    return ("an " if words[:1].lower() in "aeio" or words.startswith("SAE") else "a ") + words


def artifact_kind(header: dict[str, str]) -> str | None:
    """The ARTIFACT_KINDS name a header marks, or None."""
    return next((kind for kind, key in ARTIFACT_KINDS.items() if key in header), None)


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_header(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, str]:
    """The header metadata alone (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ItdaInputError(f"{path}: not a readable {what} ({str(exc).splitlines()[0]})") from None


def recorded_digest(header: dict[str, str]) -> str | None:
    """The content digest a header's JSON entry records, or None (files of an itda without checksums)."""
    for text in header.values():
        if text.startswith("{") and f'"{CHECKSUM_KEY}"' in text:
            try:
                value = json.loads(text).get(CHECKSUM_KEY)
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, str):
                return value
    return None


def verify_checksum(path: str | os.PathLike, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> bool:
    """True when the recorded digest matches the tensors, False when the file has none; raises on a mismatch."""
    recorded = recorded_digest(header)
    if recorded is None:
        return False
    if content_digest(tensors) != recorded:
        raise ItdaInputError(f"{path}: content checksum mismatch: the tensors were changed or corrupted after writing")
    return True


def read_tensor_file(
    path: str | os.PathLike, what: str = "safetensors file"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors), checksum verified; an unreadable file raises ItdaInputError naming it
    and `what` it should be."""
    path = Path(path)
    if not path.is_file():
        raise ItdaInputError(f"{path}: no such {what}")
    header = read_header(path, what)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ItdaInputError(f"{path}: not a readable {what} ({str(exc).splitlines()[0]})") from None
    verify_checksum(path, header, tensors)
    return header, tensors


def json_entry(header: dict[str, str], key: str, path: str | os.PathLike, what: str) -> dict:
    """The JSON object stored under `key` in the header."""
    if key not in header:
        kind = artifact_kind(header)
        raise ItdaInputError(f"{path}: not an {what}" + (f" (it is {kind_name(kind)} file of itda)" if kind else ""))
    try:
        value = json.loads(header[key])
    except json.JSONDecodeError as exc:
        raise ItdaInputError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise ItdaInputError(f"{path}: not a readable {what} (header entry '{key}' is not an object)")
    return value


def write_tensor_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: str, entry: dict | str) -> None:
    """Write tensors with `entry` (a dict, or JSON text) under `key` and their digest, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    obj = json.loads(entry) if isinstance(entry, str) else dict(entry)
    obj[CHECKSUM_KEY] = content_digest(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(obj, sort_keys=True)})
