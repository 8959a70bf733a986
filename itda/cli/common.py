"""What every command shares: one-line errors with exit code 2, input kinds, memory sizes."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Callable, Optional

import typer

from itda.errors import ItdaInputError

_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


_INTERRUPT_NOTE: list[str] = []  # what an interrupted command leaves behind (set by the command)


def on_interrupt(note: str) -> None:
    """Say `note` (e.g. where the checkpoint is) if the command is interrupted with Ctrl-C."""
    _INTERRUPT_NOTE[:] = [note]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn: Callable) -> Callable:
    """Turn ItdaInputError (and missing files) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ItdaInputError as exc:
            fail(str(exc))
        except (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
            fail(f"{exc.filename}: {exc.strerror}")
        except KeyboardInterrupt:
            typer.echo("interrupted" + (f"; {_INTERRUPT_NOTE[0]}" if _INTERRUPT_NOTE else ""), err=True)
            raise typer.Exit(130)

    return wrapper


def is_activation_file(source: str) -> bool:
    return Path(source).suffix in (".safetensors", ".npy")


def parse_memory(text: Optional[str], option: str = "--max-memory") -> Optional[int]:
    """Bytes from '400MB', '70GiB', '1.5 GB' (as accelerate's max_memory) or a bare number of GiB."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ItdaInputError(f"{option} {text!r}: give a size like 400MB, 8GB, 70GiB or a number of GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ItdaInputError(f"{option} must be > 0, got {text!r}")
    return value


ARTIFACT_KEYS = {"dictionary": "itda", "codes": "itda_codes", "sae": "itda_sae"}


def artifact_kind(path: Path) -> str | None:
    """'dictionary', 'codes' or 'sae' for an itda safetensors artifact; None otherwise."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - anything unreadable is not an itda artifact
        return None
    for kind, key in ARTIFACT_KEYS.items():
        if key in meta:
            return kind
    return None


def check_output(out: Path, inputs: list[Path], kind: str, overwrite: bool) -> None:
    """Refuse an output that is an input, a folder, or an existing file other than an itda `kind`."""
    if out.is_dir():
        raise ItdaInputError(f"{out}: is a folder; give a file name for --out")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ItdaInputError(f"{out}: Not a directory ({parent} is a file)")
            break
    for inp in inputs:
        if inp.exists() and out.exists() and out.resolve() == inp.resolve():
            raise ItdaInputError(f"{out}: --out is also an input; choose another --out")
    if out.exists() and not overwrite and artifact_kind(out) != kind:
        raise ItdaInputError(f"{out}: exists and is not an itda {kind}; choose another --out or pass --overwrite")


def check_device(device: str):
    """A torch.device the user named, refused in one line when unknown or unavailable."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ItdaInputError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ItdaInputError(f"--device {device}: CUDA is not available in this torch build or on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ItdaInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "mps"):
        raise ItdaInputError(f"--device {device}: itda runs on cpu or cuda")
    return dev


def load_dictionary_file(path: Path):
    """A dictionary file, refused in one line when missing or another itda artifact."""
    from itda.dictionary import Dictionary

    if not path.is_file():
        raise ItdaInputError(f"{path}: no such file")
    if artifact_kind(path) not in ("dictionary", None):
        raise ItdaInputError(f"{path}: is an itda {artifact_kind(path)}, not a dictionary")
    return Dictionary.load(path)
