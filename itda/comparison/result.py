"""The value every comparison measure returns."""

from __future__ import annotations

from typing import Any, NamedTuple


class Similarity(NamedTuple):
    """A similarity (higher = more alike; 1 = identical up to the measure's invariances)."""

    name: str
    value: float
    details: dict[str, Any] = {}

    def __float__(self) -> float:
        return float(self.value)
