"""`itda compare`: dispatch on what was given (models, dictionaries, activation files) and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from itda.activations.config import ModelSource
from itda.atomic import write_text_atomic
from itda.comparison.plan import CompareConfig
from itda.comparison.report import has_matplotlib, matrix_summary, save_comparison
from itda.errors import ItdaInputError


def _kind(spec: str) -> str:
    p = Path(spec)
    if p.is_dir() and any(p.glob("*.safetensors")) and not (p / "config.json").exists():
        return "dict_folder"
    if p.suffix in (".npy", ".safetensors") and not p.is_file():
        raise ItdaInputError(f"{p}: no such file")
    if p.suffix == ".npy":
        return "acts"
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                for key in fh.keys():
                    fh.get_slice(key)  # a truncated file fails here, not later as the wrong kind
        except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be read
            raise ItdaInputError(
                f"{p}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        if p.stat().st_size < 8:
            raise ItdaInputError(f"{p}: not a readable safetensors file")
        return "dict" if "itda" in meta else "acts"
    return "model"


def measure_list(text: str) -> list[str]:
    from itda.comparison.registry import check_measures

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ItdaInputError("--measures is empty; name at least one measure (e.g. jaccard,cka)")
    check_measures(names)
    return names


def compare_command(
    a: str,
    b: str,
    names: list[str],
    config: CompareConfig,
    models: ModelSource,
    *,
    corpus: str,
    field: str,
    out: Path | None,
    quiet: bool,
    overwrite: bool = False,
) -> None:
    """Compare A and B, whatever kind both are (models, dictionaries or folders of them, activation files)."""
    from itda.cli.outputs import Output, guarded

    kinds = (_kind(a), _kind(b))
    if kinds[0] != kinds[1]:
        raise ItdaInputError(
            f"compare needs two of a kind; got a {kinds[0].replace('_', ' ')} and a {kinds[1].replace('_', ' ')}"
        )
    outputs = [Output(out, "compare-report", folder=True)] if out is not None else []
    with guarded(outputs, [a, b], overwrite):
        if kinds[0] in ("dict", "dict_folder"):
            _note_dictionary_measures(names)
        if kinds[0] == "dict":
            _compare_dicts(Path(a), Path(b), out)
        elif kinds[0] == "dict_folder":
            _compare_dict_folders(Path(a), Path(b), out)
        elif kinds[0] == "acts":
            _compare_acts(Path(a), Path(b), names, out)
        else:
            _compare_models(a, b, config, models, corpus=corpus, field=field, out=out, quiet=quiet)


def _note_dictionary_measures(names: list[str]) -> None:
    from itda.comparison.registry import ACTIVATIONS, REGISTRY

    need_acts = [n for n in names if ACTIVATIONS in REGISTRY[n].needs]
    if need_acts:
        typer.echo(
            f"dictionaries alone give the Jaccard family; {', '.join(need_acts)} need activations "
            "(compare the models, or two activation files)"
        )


def _compare_dicts(a: Path, b: Path, out: Path | None) -> None:
    from itda.comparison.jaccard import SIZE_CONTROLS, jaccard
    from itda.dictionary import Dictionary

    da, db = Dictionary.load(a), Dictionary.load(b)
    res = {}
    for size in SIZE_CONTROLS:
        try:
            sim = jaccard(da, db, size=size)
        except ItdaInputError as exc:
            if size == "chance":
                continue  # tokens seen not recorded
            raise exc
        res[sim.name] = {"value": sim.value, **sim.details}
        typer.echo(
            f"{sim.name:16s} {sim.value:.4f}  ({sim.details['identity']} identities, "
            f"{sim.details['n_a']} vs {sim.details['n_b']} atoms)"
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "jaccard.json", json.dumps(res, indent=2))


def _load_folder(p: Path):
    from itda.dictionary import Dictionary

    dicts = [Dictionary.load(f) for f in sorted(p.glob("*.safetensors"))]
    dicts.sort(key=lambda d: (d.meta.layer if d.meta.layer is not None else 1 << 30, d.meta.hookpoint or ""))
    return dicts


def _compare_dict_folders(a: Path, b: Path, out: Path | None) -> None:
    from itda.comparison.jaccard import jaccard_union
    from itda.comparison.pipeline import jaccard_matrices

    da, db = _load_folder(a), _load_folder(b)
    mats = jaccard_matrices(da, db)
    _report(mats, a.name, b.name, out, {"jaccard_model": jaccard_union(da, db).value})


def _compare_acts(a: Path, b: Path, names: list[str], out: Path | None) -> None:
    from itda.activations.files import load_activations
    from itda.comparison.measures import compare_activations

    xa, xb = load_activations(a), load_activations(b)
    if len(xa) != len(xb):
        raise ItdaInputError(f"activation files must hold the same inputs: {len(xa)} vs {len(xb)} rows")
    from itda.comparison.itda_measures import ITDA_MEASURES, itda_grids
    from itda.comparison.registry import ACTIVATIONS, REGISTRY

    wanted = [n for n in names if ACTIVATIONS in REGISTRY[n].needs]
    res = compare_activations(xa.acts, xb.acts, [n for n in wanted if n not in ITDA_MEASURES])
    itda_wanted = [n for n in wanted if n in ITDA_MEASURES]
    if itda_wanted:
        from itda.comparison.result import Similarity

        grids = itda_grids([xa.acts.float()], [xb.acts.float()], itda_wanted)
        res.update({n: Similarity(n, float(g[0, 0]), {}) for n, g in grids.items()})
    for sim in res.values():
        typer.echo(f"{sim.name:16s} {sim.value:.4f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(
            out / "similarity.json",
            json.dumps({s.name: {"value": s.value, **s.details} for s in res.values()}, indent=2),
        )


def _compare_models(
    a: str, b: str, config: CompareConfig, models: ModelSource, *, corpus: str, field: str, out, quiet: bool
) -> None:
    import dataclasses

    from itda.builder.distributed import init_distributed
    from itda.cli.common import print_model_header
    from itda.comparison import compare_on_corpus

    exchange = init_distributed(models.torch_device())
    lm_a = dataclasses.replace(models, model=a).load()
    lm_b = None if b == a else dataclasses.replace(models, model=b).load()
    res = compare_on_corpus(lm_a, lm_b, corpus, field, config, progress=not quiet, exchange=exchange)
    if exchange is not None:
        import torch.distributed

        torch.distributed.destroy_process_group()
        if exchange.rank != 0:
            return
        res.notes.append(f"forward passes split over {exchange.world} ranks (torchrun)")
    for lm in [x for x in (lm_a, lm_b) if x is not None]:
        print_model_header(lm)
    typer.echo(f"{res.paired_tokens} paired tokens ({res.identity} identities), {res.seconds:.0f}s")
    for note in res.notes:
        typer.echo(note)
    if not config.include_special:
        typer.echo("BOS/special tokens dropped (--include-special to keep them)")
    _report(res.matrices, res.name_a, res.name_b, out, res.model_level)


def _report(mats: dict[str, np.ndarray], label_a: str, label_b: str, out: Path | None, model_level: dict) -> None:
    summaries = {name: matrix_summary(m) for name, m in mats.items()}
    for name, entry in summaries.items():
        acc = f", argmax accuracy {entry['argmax_accuracy']:.2f}" if "argmax_accuracy" in entry else ""
        typer.echo(f"{name:14s} {label_a} -> {label_b} layers: {entry['correspondence']}{acc}")
    for key, value in model_level.items():
        typer.echo(f"{key:14s} {value:.4f}")
    if out is not None:
        save_comparison(out, mats, label_a, label_b, model_level)
        if not has_matplotlib():
            typer.echo("matplotlib is not installed: wrote JSON and CSV only (pip install 'itda[plot]' for heatmaps)")
        typer.echo(f"wrote {out}")
