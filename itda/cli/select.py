"""`itda select`: choose documents that cover a dictionary's atoms, with a coverage report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from itda.activations.config import CorpusConfig, ModelSource
from itda.cli.common import check_device, load_dictionary_file, user_errors
from itda.cli.options import option
from itda.cli.outputs import Output, check_outputs, record_outputs
from itda.errors import ItdaInputError


@user_errors
def select(
    corpus: str = typer.Argument(..., help="Corpus: JSONL/text file or folder, or 'default'."),
    dictionary: Path = typer.Option(..., "--dict", help="Dictionary whose atoms the subset should cover."),
    budget: int = typer.Option(..., help="Documents to choose."),
    out: Path = typer.Option(..., "--out", "-o", help="subset.jsonl: the chosen documents in order of choice."),
    strategy: str = typer.Option(
        "greedy",
        help="greedy (max coverage), simscale (similarity threshold scaled up), complexity (most atoms), "
        "random, longest.",
    ),
    model: str | None = typer.Option(None, help="Model (default: the one the dictionary records)."),
    field: str = option(CorpusConfig, "field"),
    k: int | None = typer.Option(None, help="MP steps (default: the dictionary's k)."),
    support_atoms: int = typer.Option(4, help="A token counts the atoms with its largest |coefficients|, this many."),
    context: int = option(CorpusConfig, "context"),
    max_doc_tokens: int | None = typer.Option(None, help="Read at most this many tokens of each document."),
    seed: int = typer.Option(0, help="Seed of the random baseline (and of --strategy random)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an earlier itda selection."),
    device: str = option(ModelSource, "device"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Choose BUDGET documents of CORPUS that cover the most atoms of DICT; report coverage vs random and longest."""
    from itda.api import select as select_documents
    from itda.atomic import write_text_atomic
    from itda.selection.coverage import BASELINES, STRATEGIES
    from itda.selection.run import plot_curves

    device = str(check_device(device))
    if strategy not in STRATEGIES + BASELINES:
        raise ItdaInputError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES + BASELINES)}")
    if budget < 1:
        raise ItdaInputError(f"--budget must be >= 1, got {budget}")
    if support_atoms < 1:
        raise ItdaInputError(f"--support-atoms must be >= 1, got {support_atoms}")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise ItdaInputError(f"--max-doc-tokens must be >= 1, got {max_doc_tokens}")
    report_path, png_path = out.with_suffix(".report.json"), out.with_suffix(".coverage.png")
    outputs = [Output(out, "select-subset"), Output(report_path, "select-report"), Output(png_path, "select-plot")]
    check_outputs(outputs, [corpus, dictionary, model], overwrite)
    d = load_dictionary_file(dictionary)
    options: dict[str, Any] = dict(
        model=model, field=field, k=k, support_atoms=support_atoms, context=context, device=device
    )
    sel = select_documents(
        corpus, d, budget, strategy=strategy, seed=seed, max_doc_tokens=max_doc_tokens, progress=not quiet, **options
    )
    lines = [
        json.dumps({"doc": int(i), "new_atoms": int(g), "tokens": int(n), "text": text})
        for i, g, n, text in zip(sel.chosen, sel.new_atoms, sel.tokens, sel.texts, strict=True)
    ]
    sel.report.update(corpus=str(corpus), dictionary=str(dictionary), subset=str(out), support_atoms=support_atoms)
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(report_path, json.dumps(sel.report, indent=2))
    drew = plot_curves(
        sel.curves, sel.report["atoms_used_by_corpus"], png_path, f"{dictionary.name} on {Path(corpus).name}"
    )
    record_outputs(outputs)
    cov = sel.report["coverage"]
    typer.echo(
        f"{sel.report['documents']} documents, {sel.report['corpus_tokens']} tokens; the corpus uses "
        f"{sel.report['atoms_used_by_corpus']} of {sel.report['atoms_in_dictionary']} atoms"
    )
    for name in dict.fromkeys((strategy, "random", "longest")):
        typer.echo(
            f"{name:10s} {budget} documents cover {cov[name]['atoms']:.0f} atoms "
            f"({100 * cov[name]['of_corpus']:.1f}% of the corpus's)"
        )
    typer.echo(f"wrote {out}, {report_path}" + (f", {png_path}" if drew else ""))
