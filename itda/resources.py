"""Resource bounds checked before allocating: refuse in one line what cannot fit."""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from itda.errors import ItdaInputError


def format_bytes(n: float) -> str:
    """'1.5 GiB', '300 MiB', '12 KiB', '7 B'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory on `device` now (CUDA: the driver's free bytes; CPU: MemAvailable); None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except (RuntimeError, AssertionError):
            return None
    if dev.type == "cpu":
        return _meminfo_available()
    return None


def check_fits(nbytes: float, what: str, device: torch.device | str = "cpu") -> None:
    """Raise ItdaInputError when `what` (needing nbytes) exceeds the memory free on `device`."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ItdaInputError(
            f"{what} needs about {format_bytes(nbytes)}, more than the {format_bytes(free)} free "
            f"on {torch.device(device)}"
        )


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim(0); a no-op elsewhere). Long runs
    of many few-MB tensors interleaved with small long-lived objects otherwise keep every past peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
