"""The ITDA dictionary: unit-norm atoms that are real activations, with their provenance."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from itda.errors import ItdaInputError
from itda.pursuit import SparseCodes, compute_gram, decode, matching_pursuit, orthogonal_matching_pursuit
from itda.pursuit.api import DEFAULT_K, Backend
from itda.pursuit.gram import gram_fits
from itda.tensorfile import read_tensor_file, write_tensor_file
from itda.version import __version__

FORMAT_VERSION = 1
REF_FIELDS = ("doc", "pos", "char_start", "char_end", "token_id")
ATOM_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
_META_KEY = "itda"


@dataclass
class DictionaryMeta:
    """What the dictionary was built from and how. Stored as JSON in the safetensors header."""

    d: int
    k: int = DEFAULT_K
    threshold: float | None = None  # normalised loss mean((x/|x| - x_hat/|x_hat|)^2) = (2 - 2cos)/d
    min_cosine: float | None = None  # the same criterion as a cosine: loss > threshold <=> cos < min_cosine
    loss: str = "normalised_mse"
    model: str | None = None
    hookpoint: str | None = None
    layer: int | None = None
    tokenizer: str | None = None
    dataset_fingerprint: str | None = None
    build: dict[str, Any] = field(default_factory=dict)
    itda_version: str = __version__
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str, source: str) -> DictionaryMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ItdaInputError(f"{source}: metadata is not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise ItdaInputError(f"{source}: metadata is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ItdaInputError(
                f"{source}: dictionary format version {version!r} is not supported (this itda reads {FORMAT_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        if "d" not in raw:
            raise ItdaInputError(f"{source}: metadata lacks the dimension 'd'")
        meta = cls(**{k: v for k, v in raw.items() if k in known})
        meta.validate(source)
        return meta

    def validate(self, source: str) -> None:
        """Raise ItdaInputError naming the first field of the wrong type or out of range."""

        def bad(name: str, want: str) -> ItdaInputError:
            return ItdaInputError(f"{source}: metadata field '{name}' must be {want}, got {getattr(self, name)!r}")

        for name in ("d", "k"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.threshold is not None and not (_is_number(self.threshold) and 0 <= self.threshold < math.inf):
            raise bad("threshold", "a finite number >= 0 or null")
        if self.min_cosine is not None and not (_is_number(self.min_cosine) and -1 <= self.min_cosine <= 1):
            raise bad("min_cosine", "a number in [-1, 1] or null")
        if self.layer is not None and not _is_int(self.layer):
            raise bad("layer", "an integer or null")
        for name in ("model", "hookpoint", "tokenizer", "dataset_fingerprint"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "a string or null")
        if not isinstance(self.loss, str) or not isinstance(self.itda_version, str):
            raise bad("loss" if not isinstance(self.loss, str) else "itda_version", "a string")
        if not isinstance(self.build, dict):
            raise bad("build", "an object")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def cosine_to_threshold(min_cosine: float, d: int) -> float:
    """Normalised-loss threshold equivalent to a minimum cosine: (2 - 2 cos) / d."""
    return (2.0 - 2.0 * min_cosine) / d


def threshold_to_cosine(threshold: float, d: int) -> float:
    return 1.0 - threshold * d / 2.0


def empty_refs(n: int) -> torch.Tensor:
    return torch.full((n, len(REF_FIELDS)), -1, dtype=torch.int64)


class Dictionary:
    """atoms [N, d] unit rows; refs [N, 5] int64 (REF_FIELDS, -1 unknown); meta.

    The Gram matrix is computed on first use (when it fits the memory budget) and cached.
    """

    def __init__(self, atoms: torch.Tensor, refs: torch.Tensor | None = None, meta: DictionaryMeta | None = None):
        if atoms.ndim != 2:
            raise ItdaInputError(f"atoms must be 2-D [N, d], got shape {tuple(atoms.shape)}")
        if atoms.dtype not in ATOM_DTYPES:
            raise ItdaInputError(f"atoms must be float16, bfloat16 or float32, got {atoms.dtype}")
        refs = empty_refs(atoms.shape[0]) if refs is None else refs
        if refs.shape != (atoms.shape[0], len(REF_FIELDS)) or refs.dtype != torch.int64:
            raise ItdaInputError(
                f"refs must be int64 [{atoms.shape[0]}, {len(REF_FIELDS)}], got {refs.dtype} {tuple(refs.shape)}"
            )
        self.atoms = atoms
        self.refs = refs
        self.meta = meta or DictionaryMeta(d=atoms.shape[1])
        if self.meta.d != atoms.shape[1]:
            raise ItdaInputError(f"metadata says d={self.meta.d} but atoms have d={atoms.shape[1]}")
        self._gram: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.atoms.shape[0]

    def __repr__(self) -> str:
        return f"Dictionary(n_atoms={len(self)}, d={self.d}, dtype={self.atoms.dtype}, model={self.meta.model!r})"

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    def to(self, device: torch.device | str) -> Dictionary:
        out = Dictionary(self.atoms.to(device), self.refs, self.meta)
        return out

    def gram(self) -> torch.Tensor | None:
        """float32 atoms @ atoms.T, cached; None when it exceeds the memory budget."""
        if self._gram is None and gram_fits(len(self), self.atoms.device):
            self._gram = compute_gram(self.atoms)
        return self._gram

    # -- inference -------------------------------------------------------------------------
    def encoding_k(self, k: int | None = None) -> int:
        """MP steps to encode with: default the build's k (at most the atoms); an explicit k in [1, atoms]."""
        if k is None:
            return max(1, min(self.meta.k, len(self)))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(1, len(self)):
            raise ItdaInputError(f"k must be between 1 and the dictionary's {len(self)} atoms, got {k}")
        return k

    def encode(
        self, x: torch.Tensor, k: int | None = None, *, method: str = "mp", backend: Backend = "auto"
    ) -> SparseCodes:
        """Sparse codes of x [B, d] with k atoms (default: the k the dictionary was built with)."""
        k = self.meta.k if k is None else k
        x = x.to(self.atoms.device)
        if method == "mp":
            return matching_pursuit(x, self.atoms, k, gram=self.gram(), backend=backend)
        if method == "omp":
            return orthogonal_matching_pursuit(x, self.atoms, k, gram=self.gram(), backend=backend)
        raise ItdaInputError(f"unknown method {method!r}; choose 'mp' or 'omp'")

    def decode(self, codes: SparseCodes) -> torch.Tensor:
        return decode(codes, self.atoms)

    def reconstruct(self, x: torch.Tensor, k: int | None = None, **kwargs) -> torch.Tensor:
        return self.decode(self.encode(x, k, **kwargs))

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one .safetensors file (atoms, refs, JSON metadata, content checksum) atomically."""
        write_tensor_file(path, {"atoms": self.atoms, "refs": self.refs}, _META_KEY, self.meta.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Dictionary:
        """Read and validate a dictionary file; errors name the file and the problem."""
        path = Path(path)
        if not path.is_file():
            raise ItdaInputError(f"{path}: no such dictionary file")
        header, tensors = read_tensor_file(path, "safetensors file")
        if _META_KEY not in header:
            raise ItdaInputError(f"{path}: not an itda dictionary (no '{_META_KEY}' metadata)")
        meta = DictionaryMeta.from_json(header[_META_KEY], str(path))
        for name in ("atoms", "refs"):
            if name not in tensors:
                raise ItdaInputError(f"{path}: missing tensor '{name}'")
        atoms, refs = tensors["atoms"], tensors["refs"]
        if atoms.ndim != 2 or atoms.dtype not in ATOM_DTYPES:
            raise ItdaInputError(f"{path}: atoms must be a 2-D float tensor, got {atoms.dtype} {tuple(atoms.shape)}")
        if atoms.shape[1] != meta.d:
            raise ItdaInputError(f"{path}: atoms have d={atoms.shape[1]} but metadata says d={meta.d}")
        if refs.dtype != torch.int64 or refs.shape != (atoms.shape[0], len(REF_FIELDS)):
            raise ItdaInputError(
                f"{path}: refs must be int64 [{atoms.shape[0]}, {len(REF_FIELDS)}], "
                f"got {refs.dtype} {tuple(refs.shape)}"
            )
        if not bool(torch.isfinite(atoms).all()):
            raise ItdaInputError(f"{path}: atoms contain NaN or inf")
        norms = atoms.to(torch.float32).norm(dim=1)
        tol = 1e-2 if atoms.dtype != torch.float32 else 1e-4
        if atoms.shape[0] and float((norms - 1).abs().max()) > tol:
            raise ItdaInputError(
                f"{path}: atoms are not unit-norm (max |norm - 1| = {float((norms - 1).abs().max()):.3g})"
            )
        return cls(atoms.to(device), refs, meta)
