"""`itda explore` (static atom explorer) and `itda select` (data selection by atom coverage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from itda.cli.common import check_device, user_errors
from itda.errors import ItdaInputError


def _load_dictionary(path: Path):
    from itda.cli.common import artifact_kind
    from itda.dictionary import Dictionary

    if not path.is_file():
        raise ItdaInputError(f"{path}: no such file")
    if artifact_kind(path) not in ("dictionary", None):
        raise ItdaInputError(f"{path}: is an itda {artifact_kind(path)}, not a dictionary")
    return Dictionary.load(path)


@user_errors
def explore(
    dictionary: Path = typer.Argument(..., help="Dictionary to show."),
    other: Optional[Path] = typer.Argument(None, help="A second dictionary: show shared and exclusive atoms side by side."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for index.html and its data (replaces only an earlier explorer)."),
    model: Optional[str] = typer.Option(None, help="Model of DICTIONARY (default: the one it records)."),
    model_b: Optional[str] = typer.Option(None, help="Model of the second dictionary (default: the one it records)."),
    corpus: Optional[str] = typer.Option(None, help="Corpus the dictionaries were built on (default: the one they record); its held-out split gives the usage."),
    tokens: int = typer.Option(20_000, help="Held-out tokens to encode."),
    context: int = typer.Option(128),
    k: Optional[int] = typer.Option(None, help="MP steps (default: the dictionary's k)."),
    contexts: int = typer.Option(5, help="Held-out contexts per atom."),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """A static page (open OUT/index.html from disk) with one card per atom; two dictionaries side by side."""
    from itda.explore.data import shared_atoms
    from itda.explore.page import explorer_data, write_explorer
    from itda.explore.run import view_on_model

    check_device(device)
    if tokens < 1 or contexts < 0:
        raise ItdaInputError("--tokens must be >= 1 and --contexts >= 0")
    for p in (dictionary, other):
        if p is not None and out.exists() and out.resolve() == p.resolve():
            raise ItdaInputError(f"{out}: --out is also an input; choose another --out")
    dicts = [_load_dictionary(dictionary)] + ([_load_dictionary(other)] if other is not None else [])
    labels = [dictionary.stem] + ([other.stem] if other is not None else [])
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    models = [model] + ([model_b or dicts[1].meta.model or model] if other is not None else [])
    views = [view_on_model(d, label=label, model=m, corpus=corpus, tokens=tokens, context=context, k=k,
                           contexts=contexts, device=device, progress=not quiet) for d, label, m in zip(dicts, labels, models)]
    shared = shared_atoms(dicts[0], dicts[1]) if len(dicts) == 2 else None
    page = write_explorer(out, explorer_data(views, shared))
    for v in views:
        s = v["summary"]
        typer.echo(f"{v['label']}: {s['atoms']} atoms, {s['tokens']} held-out tokens, {s['dead']} unused, "
                   f"mean L0 {s['mean_l0']:.1f}, mean cosine {s['mean_cosine']:.3f}")
    if shared is not None:
        typer.echo(f"shared atoms: {len(shared)} (of {len(dicts[0])} and {len(dicts[1])})")
    typer.echo(f"wrote {page}")


@user_errors
def select(
    corpus: str = typer.Argument(..., help="Corpus: JSONL/text file or folder, or 'default'."),
    dictionary: Path = typer.Option(..., "--dict", help="Dictionary whose atoms the subset should cover."),
    budget: int = typer.Option(..., help="Documents to choose."),
    out: Path = typer.Option(..., "--out", "-o", help="subset.jsonl: the chosen documents in order of choice."),
    strategy: str = typer.Option("greedy", help="greedy (max coverage), simscale (similarity threshold scaled up), complexity (most atoms), random, longest."),
    model: Optional[str] = typer.Option(None, help="Model (default: the one the dictionary records)."),
    field: str = typer.Option("text"),
    k: Optional[int] = typer.Option(None, help="MP steps (default: the dictionary's k)."),
    support_atoms: int = typer.Option(4, help="A token counts the atoms with its largest |coefficients|, this many."),
    context: int = typer.Option(128),
    max_doc_tokens: Optional[int] = typer.Option(None, help="Read at most this many tokens of each document."),
    seed: int = typer.Option(0, help="Seed of the random baseline (and of --strategy random)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out that is not an earlier itda selection."),
    device: str = typer.Option("cpu"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Choose BUDGET documents of CORPUS that cover the most atoms of DICT; report coverage vs random and longest."""
    from itda.atomic import write_text_atomic
    from itda.select.coverage import BASELINES, STRATEGIES
    from itda.select.run import choose, corpus_supports, plot_curves

    check_device(device)
    if strategy not in STRATEGIES + BASELINES:
        raise ItdaInputError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES + BASELINES)}")
    if budget < 1:
        raise ItdaInputError(f"--budget must be >= 1, got {budget}")
    if support_atoms < 1:
        raise ItdaInputError(f"--support-atoms must be >= 1, got {support_atoms}")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise ItdaInputError(f"--max-doc-tokens must be >= 1, got {max_doc_tokens}")
    report_path, png_path = out.with_suffix(".report.json"), out.with_suffix(".coverage.png")
    _check_select_output(out, report_path, [Path(corpus), dictionary], overwrite)
    d = _load_dictionary(dictionary)
    docs, sup = corpus_supports(corpus, d, model=model, field=field, k=k, support_atoms=support_atoms, context=context,
                                max_doc_tokens=max_doc_tokens,
                                device=device, progress=not quiet)
    sel = choose(sup, len(d), budget, strategy, seed=seed)
    lines = [json.dumps({"doc": int(i), "new_atoms": int(g), "tokens": int(sup.tokens[int(i)]), "text": docs[int(i)]})
             for i, g in zip(sel.chosen, sel.new_atoms)]
    sel.report.update(corpus=str(corpus), dictionary=str(dictionary), subset=str(out), support_atoms=support_atoms)
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(report_path, json.dumps(sel.report, indent=2))
    drew = plot_curves(sel.curves, sel.report["atoms_used_by_corpus"], png_path, f"{dictionary.name} on {Path(corpus).name}")
    cov = sel.report["coverage"]
    typer.echo(f"{sel.report['documents']} documents, {sel.report['corpus_tokens']} tokens; the corpus uses "
               f"{sel.report['atoms_used_by_corpus']} of {sel.report['atoms_in_dictionary']} atoms")
    for name in dict.fromkeys((strategy, "random", "longest")):
        typer.echo(f"{name:10s} {budget} documents cover {cov[name]['atoms']:.0f} atoms ({100 * cov[name]['of_corpus']:.1f}% of the corpus's)")
    typer.echo(f"wrote {out}, {report_path}" + (f", {png_path}" if drew else ""))


def _check_select_output(out: Path, report_path: Path, inputs: list[Path], overwrite: bool) -> None:
    if out.is_dir():
        raise ItdaInputError(f"{out}: is a folder; give a file name for --out")
    for p in inputs:
        if p.exists() and out.exists() and out.resolve() == p.resolve():
            raise ItdaInputError(f"{out}: --out is also an input; choose another --out")
    if out.exists() and not overwrite:
        try:
            earlier = json.loads(report_path.read_text()).get("itda_select") == 1
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not earlier:
            raise ItdaInputError(f"{out}: exists and is not an earlier itda selection; choose another --out or pass --overwrite")
