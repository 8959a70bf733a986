"""The SAE architectures, one module each, registered here once; `--arch` chooses by name."""

from __future__ import annotations

from itda.sae.arch.base import Architecture
from itda.sae.arch.batchtopk import BatchTopK
from itda.sae.arch.matryoshka import MatryoshkaBatchTopK
from itda.sae.arch.topk import TopK

ARCHS: dict[str, Architecture] = {a.name: a for a in (TopK(), BatchTopK(), MatryoshkaBatchTopK())}
ARCH_NAMES = tuple(ARCHS)


def get_arch(name: str) -> Architecture:
    """The registered architecture `name` (KeyError names the choices)."""
    if name not in ARCHS:
        raise KeyError(f"unknown SAE architecture {name!r}; choose one of {', '.join(ARCH_NAMES)}")
    return ARCHS[name]
