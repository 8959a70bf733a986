"""What every command shares: one-line errors with exit code 2, input kinds, memory sizes."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import overload

import typer
from typer.core import TyperGroup

from itda.cli.options import flag
from itda.configfields import FieldError
from itda.errors import ItdaInputError

_UNITS = {
    "": 2**30,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


_INTERRUPT_NOTE: list[str] = []  # what an interrupted command leaves behind (set by the command)


def on_interrupt(note: str) -> None:
    """Say `note` (e.g. where the checkpoint is) if the command is interrupted with Ctrl-C."""
    _INTERRUPT_NOTE[:] = [note]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


try:  # typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _cli_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as _cli_errors


class OneLineErrors(TyperGroup):
    """The command group: usage errors (unknown option, bad choice, wrong type) as one line and exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _cli_errors.NoArgsIsHelpError as exc:
            exc.show()  # `itda` alone, `itda sae`: the help text
            sys.exit(exc.exit_code)
        except _cli_errors.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            typer.echo(f"error: {where}{' '.join(exc.format_message().split())}", err=True)
            sys.exit(2)
        except _cli_errors.ClickException as exc:
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def user_errors(fn: Callable) -> Callable:
    """Turn ItdaInputError (and missing files) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FieldError as exc:  # a config field's value: named by its flag
            fail(exc.named(flag(exc.field), flag))
        except ItdaInputError as exc:
            fail(str(exc))
        except (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError, NotADirectoryError) as exc:
            fail(_os_error_line(exc))
        except KeyboardInterrupt:
            typer.echo("interrupted" + (f"; {_INTERRUPT_NOTE[0]}" if _INTERRUPT_NOTE else ""), err=True)
            raise typer.Exit(130) from None

    return wrapper


def _os_error_line(exc: OSError) -> str:
    """'path: reason' for a missing or unreadable file; a library's error without a path is shown as it is."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def is_activation_file(source: str) -> bool:
    return Path(source).suffix in (".safetensors", ".npy")


@overload
def parse_memory(text: str, option: str = ...) -> int: ...
@overload
def parse_memory(text: None, option: str = ...) -> None: ...
@overload
def parse_memory(text: str | None, option: str = ...) -> int | None: ...


def parse_memory(text: str | None, option: str = "--max-memory") -> int | None:
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


def check_output(out: Path, inputs: list[Path], kind: str, overwrite: bool) -> None:
    """Refuse an output that is an input, a folder, or an existing file other than an itda `kind`
    (see itda.cli.outputs)."""
    from itda.cli.outputs import Output, check_outputs

    check_outputs([Output(out, kind)], inputs, overwrite)


def check_checkpoint(checkpoint: Path | None, outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse a --checkpoint that is a folder, one of the outputs or an input."""
    if checkpoint is None:
        return
    if checkpoint.is_dir():
        raise ItdaInputError(f"{checkpoint}: --checkpoint is a folder; give a file name")
    if checkpoint.resolve() in {p.resolve() for p in outputs}:
        raise ItdaInputError(f"{checkpoint}: --checkpoint is also an output; choose another --checkpoint")
    if checkpoint.resolve() in {p.resolve() for p in inputs if p.exists()}:
        raise ItdaInputError(f"{checkpoint}: --checkpoint is also an input; choose another --checkpoint")


def checked_k(k: int | None, d) -> int:
    """k for encoding with dictionary d (Dictionary.encoding_k), the error naming --k."""
    try:
        return d.encoding_k(k)
    except ItdaInputError as exc:
        raise ItdaInputError(f"--{exc}") from None


def check_device(device: str):
    """The torch.device a user named (auto: CUDA when available), refused in one line naming --device."""
    from itda.devices import choose_device

    return choose_device(device)


def print_model_header(lm) -> None:
    """One line saying which model runs where, in what dtype (and the folder a hub ID or GGUF file resolved to)."""
    from itda.devices import describe

    where = "" if str(lm.source) == lm.name else f" (from {lm.source})"
    typer.echo(f"model {lm.name}{where} on {describe(lm.device, lm.dtype)}")


def load_dictionary_file(path: Path):
    """A dictionary file, refused in one line when missing or another itda artifact."""
    from itda.cli.outputs import header_kind
    from itda.dictionary import Dictionary

    if not path.is_file():
        raise ItdaInputError(f"{path}: no such file")
    if header_kind(path) not in ("dictionary", None):
        raise ItdaInputError(f"{path}: is an itda {header_kind(path)}, not a dictionary")
    return Dictionary.load(path)


def print_summary(summary: dict) -> None:
    """One `key value` line per entry of a report's summary (floats to 6 significant digits)."""
    for key, value in summary.items():
        typer.echo(f"{key:16s} {value:.6g}" if isinstance(value, float) else f"{key:16s} {value}")


def write_report(summary: dict, out: Path | None, outputs: list) -> None:
    """An evaluation summary: written to `out` as JSON when given (and recorded as `outputs`), then printed."""
    import json

    from itda.atomic import write_text_atomic
    from itda.cli.outputs import record_outputs

    if out is not None:
        write_text_atomic(out, json.dumps(summary, indent=2))
        record_outputs(outputs)
    print_summary(summary)
