"""Activation files: safetensors or .npy holding [T, d], with optional refs [T, 5]."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from itda.atomic import atomic_path
from itda.dictionary import REF_FIELDS
from itda.errors import ItdaInputError
from itda.tensorfile import artifact_kind, kind_name, read_tensor_file

ACTS_KEY = "activations"
REFS_KEY = "refs"


class ActivationSet:
    """In-memory activations [T, d] and refs [T, 5] int64 (-1 unknown)."""

    def __init__(self, acts: torch.Tensor, refs: torch.Tensor | None = None, source: str = "<memory>"):
        self.acts = acts
        if refs is None:  # without refs an activation is known by its row: doc = row, pos = 0
            refs = torch.full((acts.shape[0], len(REF_FIELDS)), -1, dtype=torch.int64)
            refs[:, 0] = torch.arange(acts.shape[0])
            refs[:, 1] = 0
        self.refs = refs
        self.source = source
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the activations and refs: the identity of this stream."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            h.update(str((tuple(self.acts.shape), str(self.acts.dtype))).encode())
            h.update(self.acts.contiguous().view(torch.uint8).numpy().tobytes() if self.acts.numel() else b"")
            h.update(self.refs.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def __len__(self) -> int:
        return self.acts.shape[0]

    @property
    def d(self) -> int:
        return self.acts.shape[1]

    def batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stop = len(self) if stop is None else stop
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            yield self.acts[s:e], self.refs[s:e]


def load_activations(path: str | os.PathLike) -> ActivationSet:
    """Load and validate an activation file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ItdaInputError(f"{path}: no such activation file")
    refs = None
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ItdaInputError(f"{path}: not a readable .npy array ({exc})") from None
        acts = torch.from_numpy(np.ascontiguousarray(arr))
    elif path.suffix == ".safetensors":
        header, tensors = read_tensor_file(path, "safetensors file")
        if kind := artifact_kind(header):
            raise ItdaInputError(f"{path}: is {kind_name(kind)} file of itda, not an activation file")
        if ACTS_KEY not in tensors:
            raise ItdaInputError(
                f"{path}: expected a tensor named '{ACTS_KEY}' "
                f"(found {', '.join(map(repr, sorted(tensors))) or 'none'})"
            )
        acts = tensors[ACTS_KEY]
        refs = tensors.get(REFS_KEY)
    else:
        raise ItdaInputError(f"{path}: unsupported activation file type '{path.suffix}' (use .safetensors or .npy)")
    if acts.ndim != 2:
        raise ItdaInputError(f"{path}: activations must be 2-D [tokens, d], got shape {tuple(acts.shape)}")
    if not acts.is_floating_point():
        raise ItdaInputError(f"{path}: activations must be floating point, got {acts.dtype}")
    if acts.shape[0] == 0:
        raise ItdaInputError(f"{path}: no activations (0 rows)")
    if acts.shape[1] == 0:
        raise ItdaInputError(f"{path}: activations have 0 columns")
    if not bool(torch.isfinite(acts).all()):
        bad = int((~torch.isfinite(acts)).any(1).sum())
        raise ItdaInputError(f"{path}: {bad} activation rows contain NaN or inf")
    if refs is not None and (refs.shape != (acts.shape[0], len(REF_FIELDS)) or refs.dtype != torch.int64):
        raise ItdaInputError(
            f"{path}: refs must be int64 [{acts.shape[0]}, {len(REF_FIELDS)}], got {refs.dtype} {tuple(refs.shape)}"
        )
    return ActivationSet(acts, refs, str(path))


def save_activations(path: str | Path, acts: torch.Tensor, refs: torch.Tensor | None = None) -> None:
    tensors = {ACTS_KEY: acts.contiguous()}
    if refs is not None:
        tensors[REFS_KEY] = refs.to(torch.int64).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
