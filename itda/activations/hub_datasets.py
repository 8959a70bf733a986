"""Corpora as the `datasets` library names them: a hub dataset ID or a local dataset repository folder,
read in streaming mode and only as far as the caller indexes.

A corpus string names one: 'org/name' (split train), 'org/name:split' or 'org/name:config:split'
(dataset_spec writes it, parse_dataset_spec reads it back), so the corpus a dictionary records
re-reads the same documents.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from itda.activations.hub import first_line, is_hub_id
from itda.errors import ItdaInputError, quiet_logger

_DATA_FILES = ("*.parquet", "*.jsonl", "*.json", "*.csv", "*.jsonl.gz", "*.json.gz")
_SAVED = ("state.json", "dataset_dict.json")  # what save_to_disk writes at the top of its folder


@dataclass(frozen=True)
class DatasetSpec:
    """Where a streamed corpus comes from: a hub ID or a local repository folder, its config and split."""

    repo: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        if self.config:
            return f"{self.repo}:{self.config}:{self.split}"
        return self.repo if self.split == "train" else f"{self.repo}:{self.split}"


def is_dataset_repo(path: Path) -> bool:
    """A folder laid out as a dataset repository: data files (Parquet, JSONL, ...), no .txt documents,
    not a save_to_disk folder."""
    if not path.is_dir() or any((path / name).exists() for name in _SAVED):
        return False
    if any(p.is_file() for p in path.rglob("*.txt")):
        return False
    return any(p.is_file() for pattern in _DATA_FILES for p in path.rglob(pattern))


def parse_dataset_spec(corpus: str) -> DatasetSpec | None:
    """The DatasetSpec a corpus string names, or None when it names something else (a file, 'default')."""
    if Path(corpus).exists():
        return DatasetSpec(corpus) if is_dataset_repo(Path(corpus)) else None
    repo, *rest = corpus.split(":")
    if len(rest) > 2 or not (is_hub_id(repo) or is_dataset_repo(Path(repo))):
        return None
    if len(rest) == 2:
        return DatasetSpec(repo, rest[0] or None, rest[1] or "train")
    return DatasetSpec(repo, None, rest[0] if rest else "train")


def dataset_spec(corpus: str, split: str = "train", config: str | None = None) -> str:
    """The corpus string of `corpus` read at `split` with `config` (unchanged for files and 'default')."""
    if (split == "train" and config is None) or parse_dataset_spec(corpus) is None:
        return corpus
    return str(DatasetSpec(corpus, config, split))


class StreamedDocuments(Sequence[str]):
    """The `field` of each row of a streamed dataset, read on first access and kept; len() reads them all."""

    def __init__(self, spec: DatasetSpec, field: str):
        self.spec, self.field = spec, field
        self._docs: list[str] = []
        self._rows: Iterator[str] | None = None
        self._done = False

    def _read_to(self, n: int | None) -> None:
        if self._rows is None:
            self._rows = _stream_field(self.spec, self.field)
        while not self._done and (n is None or len(self._docs) < n):
            try:
                self._docs.append(next(self._rows))
            except StopIteration:
                self._done = True

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...
    def __getitem__(self, i):
        if isinstance(i, slice) or i < 0:
            self._read_to(None)
            return self._docs[i]
        self._read_to(i + 1)
        return self._docs[i]

    def __len__(self) -> int:
        self._read_to(None)
        return len(self._docs)

    @property
    def read(self) -> list[str]:
        """The documents read so far."""
        return self._docs


def _stream_field(spec: DatasetSpec, field: str) -> Iterator[str]:
    rows = iter(_open(spec))
    try:
        first = next(rows)
    except StopIteration:
        return
    except Exception as exc:  # noqa: BLE001 - datasets/fsspec/pyarrow errors: one line naming the dataset
        raise ItdaInputError(f"dataset {spec}: cannot be read ({first_line(exc)})") from None
    if field not in first:
        raise ItdaInputError(
            f"dataset {spec}: no field '{field}' (fields: {', '.join(first)}); choose one with --field"
        )
    yield str(first[field])
    for row in rows:
        yield str(row[field])


def _open(spec: DatasetSpec):
    try:
        from datasets import load_dataset
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error
    except ImportError:
        raise ItdaInputError(
            f"reading the dataset {spec} needs the 'datasets' package (pip install 'itda[datasets]')"
        ) from None
    set_verbosity_error()
    disable_progress_bar()
    try:
        with quiet_logger("huggingface_hub"):  # a warning line per network retry
            return load_dataset(spec.repo, name=spec.config, split=spec.split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - not found, no network, no such split or config
        raise ItdaInputError(f"dataset {spec}: cannot be opened ({type(exc).__name__}: {first_line(exc)})") from None
