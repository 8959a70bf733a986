"""`itda explore`: the static atom explorer of one dictionary, or of two side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from itda.activations.config import CorpusConfig, ModelSource
from itda.cli.common import check_device, load_dictionary_file, user_errors
from itda.cli.options import option
from itda.cli.outputs import Output, check_outputs, record_outputs
from itda.errors import ItdaInputError


@user_errors
def explore(
    dictionary: Path = typer.Argument(
        ..., help="Dictionary to show, or an SAE (itda file, SAELens or sparsify folder): one card per latent."
    ),
    other: Path | None = typer.Argument(
        None, help="A second dictionary: show shared and exclusive atoms side by side."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for index.html and its data (replaces only an earlier explorer)."
    ),
    model: str | None = typer.Option(None, help="Model of DICTIONARY (default: the one it records)."),
    model_b: str | None = typer.Option(None, help="Model of the second dictionary (default: the one it records)."),
    corpus: str | None = typer.Option(
        None,
        help="Corpus the dictionaries were built on (default: the one they record); "
        "its held-out split gives the usage.",
    ),
    tokens: int = typer.Option(20_000, help="Held-out tokens to encode."),
    context: int = option(CorpusConfig, "context"),
    k: int | None = typer.Option(None, help="MP steps (default: the dictionary's k)."),
    contexts: int = typer.Option(5, help="Held-out contexts per atom."),
    device: str = option(ModelSource, "device"),
    overwrite: bool = typer.Option(
        False, help="Replace an earlier explorer folder that was changed since itda wrote it."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """A static page (open OUT/index.html from disk) with one card per atom; two dictionaries side by side."""
    from itda.api import explore as write_explorer

    device = str(check_device(device))
    if tokens < 1 or contexts < 0:
        raise ItdaInputError("--tokens must be >= 1 and --contexts >= 0")
    outputs = [Output(out, "explorer", folder=True)]
    check_outputs(outputs, [dictionary, other, model, model_b], overwrite)
    from itda.sae.io import load_sae_or_none

    sae = load_sae_or_none(dictionary)
    if sae is not None:
        if other is not None:
            raise ItdaInputError("an SAE is explored alone (no second argument)")
        options = dict(corpus=corpus, tokens=tokens, context=context, contexts=contexts, device=device)
        _explore_sae(sae, dictionary.stem, out, model, outputs, quiet, options)
        return
    first = load_dictionary_file(dictionary)
    second = load_dictionary_file(other) if other is not None else None
    labels = [dictionary.stem] + ([other.stem] if other is not None else [])
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    options: dict[str, Any] = dict(corpus=corpus, tokens=tokens, context=context, k=k, contexts=contexts, device=device)
    page = write_explorer(
        first, out, other=second, model=model, model_b=model_b, labels=labels, progress=not quiet, **options
    )
    record_outputs(outputs)
    _say(page, quiet)
    if second is not None:
        assert page.shared is not None  # two dictionaries: their shared atoms
        typer.echo(f"shared atoms: {len(page.shared)} (of {len(first)} and {len(second)})")
    typer.echo(f"wrote {page.index}")


def _explore_sae(sae, label: str, out: Path, model, outputs, quiet: bool, options: dict) -> None:
    """The explorer of an SAE's latents, written and reported."""
    from itda.api import explore_sae

    page = explore_sae(sae, out, model=model, label=label, progress=not quiet, **options)
    record_outputs(outputs)
    _say(page, quiet, last=True)


def _say(page, quiet: bool, last: bool = False) -> None:
    """Each view's summary line (and, with `last`, where the page is)."""
    for v in page.views:
        s, what = v["summary"], "latents" if v.get("kind") == "sae" else "atoms"
        typer.echo(
            f"{v['label']}: {s['atoms']} {what}, {s['tokens']} held-out tokens, {s['dead']} unused, "
            f"mean L0 {s['mean_l0']:.1f}, mean cosine {s['mean_cosine']:.3f}"
        )
    if last:
        typer.echo(f"wrote {page.index}")
