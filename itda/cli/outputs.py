"""The output guard every writing command goes through: nothing good is overwritten.

An output may replace an existing file or folder only when itda wrote it: an itda safetensors
artifact of the same kind (recognised by its header), or a file or folder recorded, with its
kind and content digest, in the manifest `.itda-outputs.json` beside it when a command wrote it
(so a report the user has since edited counts as theirs). Anything else needs `--overwrite`;
an input is never an output, not even with `--overwrite`. The folder must be writable, which
is checked before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from itda.atomic import write_text_atomic
from itda.errors import ItdaInputError
from itda.tensorfile import ARTIFACT_KINDS, artifact_kind, kind_name

MANIFEST = ".itda-outputs.json"


class Output(NamedTuple):
    """A file (or, with folder=True, a folder) a command will write, and what it holds."""

    path: Path
    kind: str  # an ARTIFACT_KINDS name, or a report kind such as 'eval-report'
    folder: bool = False


def header_kind(path: Path) -> str | None:
    """The ARTIFACT_KINDS name of an itda safetensors file; None for anything else."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return artifact_kind(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not an itda artifact
        return None


def digest(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file digest) listing."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{p.relative_to(path).as_posix()}\0{digest(p)}\n".encode())
        return "tree:" + h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()) else {}


def is_own(out: Output) -> bool:
    """Whether the existing out.path is an earlier itda output of out.kind."""
    if out.kind in ARTIFACT_KINDS and not out.folder and header_kind(out.path) == out.kind:
        return True
    entry = _manifest(out.path.parent).get(out.path.name)
    return bool(entry) and entry.get("kind") == out.kind and entry.get("sha256") == digest(out.path)


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def _inside(inner: Path, outer: Path) -> bool:
    return outer.resolve() in inner.resolve().parents


def _check_place(out: Output) -> None:
    path = out.path
    if path.is_dir() and not out.folder:
        raise ItdaInputError(f"{path}: is a folder; give a file name for --out")
    if path.exists() and not path.is_dir() and out.folder:
        raise ItdaInputError(f"{path}: is a file; give a folder for --out")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ItdaInputError(f"{path}: Not a directory ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ItdaInputError(f"{path}: cannot write in {parent} (Permission denied)")
            return


def check_outputs(outputs: Sequence[Output], inputs: Iterable[str | Path | None], overwrite: bool = False) -> None:
    """Refuse, before any work, outputs that are inputs, hold inputs, lie inside an input folder, or would
    replace what itda did not write."""
    paths = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for out in outputs:
        _check_place(out)
        for inp in paths:
            if _same(out.path, inp):
                raise ItdaInputError(f"{out.path}: --out is also an input; choose another --out")
            if out.folder and out.path.exists() and _inside(inp, out.path):
                raise ItdaInputError(f"{out.path}: --out holds the input {inp}; choose another --out")
            if inp.is_dir() and _inside(out.path, inp):  # a model's or corpus folder's files are the input
                raise ItdaInputError(f"{out.path}: --out is inside the input folder {inp}; choose another --out")
        if out.path.exists() and not overwrite and not is_own(out):
            what = "folder" if out.folder else "file"
            raise ItdaInputError(
                f"{out.path}: exists and is not {kind_name(out.kind)} {what} itda wrote; "
                "choose another --out or pass --overwrite"
            )


def record_outputs(outputs: Sequence[Output]) -> None:
    """Note each written output's kind and digest in its folder's manifest (best effort; rank 0 under torchrun)."""
    from itda.builder.distributed import rank_from_env

    if rank_from_env() != 0:
        return
    by_folder: dict[Path, list[Output]] = {}
    for out in outputs:
        if out.path.exists():
            by_folder.setdefault(out.path.parent, []).append(out)
    for folder, outs in by_folder.items():
        entries = _manifest(folder)
        if (folder / MANIFEST).exists() and not entries and (folder / MANIFEST).stat().st_size > 2:
            continue  # not ours: leave it alone
        entries.update({o.path.name: {"kind": o.kind, "sha256": digest(o.path)} for o in outs})
        with contextlib.suppress(OSError):
            write_text_atomic(folder / MANIFEST, json.dumps(entries, indent=1, sort_keys=True) + "\n")


@contextlib.contextmanager
def guarded(outputs: Sequence[Output], inputs: Iterable[str | Path], overwrite: bool = False):
    """check_outputs before the body, record_outputs after it succeeds."""
    check_outputs(outputs, inputs, overwrite)
    yield
    record_outputs(outputs)
