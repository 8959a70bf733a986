"""The README's main job: smollm2-135m, the default corpus, a middle layer, build + evaluate + report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint, n_layers
from itda.activations.models import load_model
from itda.atomic import write_text_atomic
from itda.builder import BuildConfig
from itda.dictionary import Dictionary
from itda.builder.from_model import build_from_model
from itda.evaluation.on_model import evaluate_contexts

DEMO_MODEL = "smollm2-135m"
DEMO_K = 40
DEMO_MIN_COSINE = 0.85


def atom_snippet(docs: list[str], refs_row: list[int], width: int = 40) -> str:
    """The atom's token in its document, marked with [[ ]], with some context either side."""
    doc, _pos, cs, ce, _tid = refs_row
    if doc < 0 or cs < 0:
        return "(no text reference)"
    text = docs[doc]
    left = text[max(0, cs - width) : cs].replace("\n", " ")
    right = text[ce : ce + width].replace("\n", " ")
    return f"...{left}[[{text[cs:ce]}]]{right}..."


def run_demo(out: Path, tokens: int, eval_tokens: int = 8192, model: str = DEMO_MODEL, layer: int | None = None) -> dict:
    lm = load_model(model)
    layer = n_layers(lm.model) // 2 if layer is None else layer
    hp = Hookpoint("resid_post", layer)
    docs, contexts = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=tokens)
    config = BuildConfig(k=DEMO_K, min_cosine=DEMO_MIN_COSINE)
    result = build_from_model(lm, [hp], contexts, config, corpus_name="default")
    dictionary = result.dictionaries[hp]
    out.mkdir(parents=True, exist_ok=True)
    dictionary.save(out / f"{hp.file_stem}.safetensors")

    t0 = time.perf_counter()
    _, held = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=eval_tokens)
    report = evaluate_contexts(lm, dictionary, hp, held)
    summary = {
        **report.summary(),
        "dictionary_size": len(dictionary),
        "build_tokens": result.tokens,
        "build_seconds": result.seconds,
        "build_tokens_per_s": result.tokens_per_s,
        "forward_seconds": result.forward_seconds,
        "eval_seconds": time.perf_counter() - t0,
    }
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2))
    _print_report(summary, dictionary, docs)
    from itda.explorer.page import explorer_data, write_explorer
    from itda.explorer.run import view_on_model

    view = view_on_model(dictionary, label=hp.file_stem, lm=lm, model=model, tokens=eval_tokens, progress=False)
    page = write_explorer(out / "explorer", explorer_data([view]))
    typer.echo(f"wrote {out / (hp.file_stem + '.safetensors')}, {out / 'report.json'} and the atom explorer {page}")
    return summary


def _print_report(s: dict, dictionary: Dictionary, docs: list[str]) -> None:
    typer.echo("")
    typer.echo(f"model {s['model']}, {s['hookpoint']}: {s['dictionary_size']} atoms (k={DEMO_K}, min cosine {DEMO_MIN_COSINE})")
    typer.echo(f"built from {s['build_tokens']:,} tokens in {s['build_seconds']:.0f}s ({s['build_tokens_per_s']:,.0f} tokens/s, forward {s['forward_seconds']:.0f}s)")
    typer.echo(
        f"held-out {s['tokens']:,} tokens: FVU {s['fvu']:.3f}, mean cosine {s['mean_cosine']:.3f}, L0 {s['l0']:.1f}, "
        f"dead atoms {s['dead_atoms']}"
    )
    typer.echo(
        f"CE-loss score {s['ce_loss_score']:.3f} (CE clean {s['ce_clean']:.3f}, spliced {s['ce_spliced']:.3f}, "
        f"zero-ablated {s['ce_zero']:.3f})"
    )
    n = len(dictionary)
    picks = [0, n // 4, n // 2, 3 * n // 4, n - 1] if n >= 5 else list(range(n))
    typer.echo("some atoms and the text they came from:")
    for i in picks:
        typer.echo(f"  atom {i:6d}: {atom_snippet(docs, dictionary.refs[i].tolist())}")
