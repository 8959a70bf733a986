"""CLI options built from the configuration dataclasses: the default and the help come from the field.

`option(Config, "name", ...)` is a typer.Option whose default and help are those of the field; it
records the field (`.itda_field`) so tests/test_configs.py can check the CLI against the configs.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

import typer

from itda.configfields import field_default, field_help


def option(
    config: type, name: str, *param_decls: str, help: str | None = None, choices: type[Enum] | None = None
) -> Any:
    """typer.Option for field `name` of dataclass `config` (required when the field has no default);
    `choices`: the Enum the CLI offers for a str field; `help` overrides the field's."""
    default = field_default(config, name)
    if default is dataclasses.MISSING:
        default = ...
    elif choices is not None:
        default = choices(default)
    info = typer.Option(default, *param_decls, help=help if help is not None else field_help(config, name))
    info.itda_field = (config, name)
    return info


def flag(field: str) -> str:
    """The CLI flag of a config field: max_memory -> --max-memory."""
    return "--" + field.replace("_", "-")
