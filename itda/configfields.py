"""Helpers for the configuration dataclasses: fields that carry a one-line help, errors that name a field.

The dataclasses (itda.activations.config, itda.builder.BuildConfig, itda.sae.train) are the one place a
choice, its default and its help live; the CLI builds its options from them (itda.cli.options).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from itda.errors import ItdaInputError


def choice(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A dataclass field with `default` and a one-line `help` (kept in the field's metadata)."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    """The one-line help of field `name` of dataclass `cls` ('' when it has none)."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def field_default(cls: type, name: str) -> Any:
    """The default of field `name` of dataclass `cls` (dataclasses.MISSING when it is required)."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


class FieldError(ItdaInputError):
    """A refused value of a config field. `message` names the field as {field} (or is put after it), and
    each field in `others` (a remedy may name more than one) as {that_field}; str() names them as the
    config does, `named(flag, flag)` as the CLI does."""

    def __init__(self, field: str, message: str, *, others: tuple[str, ...] = ()):
        self.field = field
        self.others = others
        self.message = message if "{field}" in message else "{field} " + message
        super().__init__(self.named(field))

    def named(self, name: str, rename: Callable[[str], str] | None = None) -> str:
        """The message with the field called `name` (e.g. its CLI flag) and each of `others` rename(it)."""
        text = self.message
        for other in self.others:
            text = text.replace("{" + other + "}", rename(other) if rename is not None else other)
        return text.replace("{field}", name)
