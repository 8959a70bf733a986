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
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            fail(f"{exc.filename}: {exc.strerror}")

    return wrapper


def is_activation_file(source: str) -> bool:
    return Path(source).suffix in (".safetensors", ".npy")


def parse_memory(text: Optional[str]) -> Optional[int]:
    """Bytes from '400MB', '70GiB', '1.5 GB' (as accelerate's max_memory) or a bare number of GiB."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ItdaInputError(f"--max-memory {text!r}: give a size like 400MB, 8GB, 70GiB or a number of GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ItdaInputError(f"--max-memory must be > 0, got {text!r}")
    return value
