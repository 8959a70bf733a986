"""`itda` commands: thin wrappers over the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import functools
import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import torch
import typer

from itda.errors import ItdaInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inference-Time Decomposition of Activations.")


class Mode(str, Enum):
    improved = "improved"
    reference = "reference"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    numba = "numba"


class Method(str, Enum):
    mp = "mp"
    omp = "omp"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


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


def _threshold_args(threshold: Optional[float], min_cosine: Optional[float]) -> dict:
    if threshold is not None and min_cosine is not None:
        raise ItdaInputError("give --threshold or --min-cosine, not both")
    if threshold is None and min_cosine is None:
        min_cosine = DEFAULT_MIN_COSINE
    return {"threshold": threshold, "min_cosine": min_cosine}


DEFAULT_MIN_COSINE = 0.85


@app.command()
@user_errors
def build(
    acts: Path = typer.Argument(..., help="Activation file: .safetensors ('activations' [T, d], optional 'refs' [T, 5]) or .npy [T, d]."),
    out: Path = typer.Option(..., "--out", "-o", help="Dictionary file to write (.safetensors)."),
    k: int = typer.Option(40, help="Matching-pursuit steps per activation."),
    threshold: Optional[float] = typer.Option(None, help="Add rows whose normalised loss (2-2cos)/d exceeds this."),
    min_cosine: Optional[float] = typer.Option(None, help=f"Add rows reconstructed with cosine below this (default {DEFAULT_MIN_COSINE})."),
    mode: Mode = typer.Option(Mode.improved, help="improved (default) or reference (the paper's code)."),
    batch_size: int = typer.Option(4096, help="Activations scored per step."),
    max_atoms: Optional[int] = typer.Option(None, help="Stop adding atoms at this size."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint file; an existing one is resumed."),
    checkpoint_every: int = typer.Option(10, help="Batches between checkpoints."),
    dtype: DType = typer.Option(DType.float32, help="Storage dtype of the atoms."),
    backend: Backend = typer.Option(Backend.auto, help="Pursuit backend."),
    device: str = typer.Option("cpu", help="torch device (cpu, cuda, cuda:1)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build a dictionary from an activation file."""
    from itda.activations.files import load_activations
    from itda.build import build_dictionary

    if batch_size < 1:
        raise ItdaInputError(f"--batch-size must be >= 1, got {batch_size}")
    data = load_activations(acts)
    t0 = time.perf_counter()
    dictionary = build_dictionary(
        data.batches(batch_size),
        k=k,
        mode=mode.value,
        max_atoms=max_atoms,
        backend=backend.value,
        device=device,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every if checkpoint else 0,
        progress=not quiet,
        total_tokens=len(data),
        **_threshold_args(threshold, min_cosine),
    )
    dictionary.meta.build["source"] = Path(data.source).name
    if dtype is DType.float16:
        dictionary = type(dictionary)(dictionary.atoms.half(), dictionary.refs, dictionary.meta)
    dictionary.save(out)
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    typer.echo(f"{out}: {len(dictionary)} atoms, d={dictionary.d}, from {len(data)} tokens in {time.perf_counter() - t0:.1f}s")


@app.command()
@user_errors
def info(dictionary: Path = typer.Argument(..., help="Dictionary file."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Summarise a dictionary."""
    from itda.dictionary import REF_FIELDS, Dictionary

    d = Dictionary.load(dictionary)
    summary = {"file": str(dictionary), "n_atoms": len(d), "dtype": str(d.atoms.dtype).replace("torch.", ""), **json.loads(d.meta.to_json())}
    known = (d.refs[:, 0] >= 0).sum().item()
    summary["atoms_with_refs"] = int(known)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:20s} {value}")
    if len(d):
        typer.echo("first atoms: " + ", ".join(
            "(" + ", ".join(f"{f}={int(v)}" for f, v in zip(REF_FIELDS, row)) + ")" for row in d.refs[:3].tolist()
        ))


@app.command()
@user_errors
def encode(
    dictionary: Path = typer.Argument(..., help="Dictionary file."),
    acts: Path = typer.Argument(..., help="Activation file."),
    out: Path = typer.Option(..., "--out", "-o", help="Codes file to write (.safetensors: indices, values, residual_sq)."),
    k: Optional[int] = typer.Option(None, help="Atoms per activation (default: the dictionary's k)."),
    method: Method = typer.Option(Method.mp),
    backend: Backend = typer.Option(Backend.auto),
    batch_size: int = typer.Option(8192),
) -> None:
    """Encode activations into sparse codes."""
    from safetensors.torch import save_file

    from itda.activations.files import load_activations
    from itda.atomic import atomic_path
    from itda.dictionary import Dictionary
    from itda.pursuit.codes import cat_codes

    d = Dictionary.load(dictionary)
    data = load_activations(acts)
    if data.d != d.d:
        raise ItdaInputError(f"dimension mismatch: {acts} has d={data.d}, {dictionary} has d={d.d}")
    parts = [d.encode(x, k, method=method.value, backend=backend.value) for x, _ in data.batches(batch_size)]
    codes = cat_codes(parts)
    with atomic_path(out) as tmp:
        save_file({f: getattr(codes, f).contiguous() for f in codes._fields}, str(tmp), metadata={"dictionary": str(dictionary), "method": method.value})
    typer.echo(f"{out}: codes for {len(data)} tokens, k={codes.indices.shape[1]}")


@app.command("eval")
@user_errors
def eval_cmd(
    dictionary: Path = typer.Argument(..., help="Dictionary file."),
    acts: Path = typer.Argument(..., help="Activation file to evaluate on."),
    k: Optional[int] = typer.Option(None, help="Atoms per activation (default: the dictionary's k)."),
    method: Method = typer.Option(Method.mp),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON."),
    batch_size: int = typer.Option(8192),
) -> None:
    """FVU, cosine, normalised loss, L0 and atom usage on an activation file."""
    from itda.activations.files import load_activations
    from itda.atomic import write_text_atomic
    from itda.dictionary import Dictionary
    from itda.evaluate import evaluate

    d = Dictionary.load(dictionary)
    data = load_activations(acts)
    if data.d != d.d:
        raise ItdaInputError(f"dimension mismatch: {acts} has d={data.d}, {dictionary} has d={d.d}")
    report = evaluate(d, (x for x, _ in data.batches(batch_size)), k=k, method=method.value)
    summary = report.summary()
    if out is not None:
        write_text_atomic(out, json.dumps(summary, indent=2))
    for key, value in summary.items():
        typer.echo(f"{key:16s} {value:.6g}" if isinstance(value, float) else f"{key:16s} {value}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Folder for the dictionary and report."),
    tokens: int = typer.Option(100_000, help="Tokens to build from."),
) -> None:
    """Build and evaluate a dictionary on the embedded default data, then print a report."""
    from itda.demo import run_demo

    run_demo(out, tokens)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
