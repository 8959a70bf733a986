"""numba compilation that caches to disk where it can and compiles in memory where it cannot."""

from __future__ import annotations

from collections.abc import Callable

import numba


def njit_cached(**options) -> Callable:
    """`numba.njit(cache=True, **options)`, or without the disk cache when numba finds no writable place.

    numba caches beside the source file, else under the user's cache folder; a read-only
    installation with an unwritable HOME (containers, CI runners, shared clusters) has neither,
    and `cache=True` then raises at decoration time.
    """

    def decorate(fn: Callable) -> Callable:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as exc:
            if "cannot cache" not in str(exc):
                raise
            return numba.njit(**options)(fn)

    return decorate
