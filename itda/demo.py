"""The README's main job: smollm2-135m, the default corpus, a middle layer, build + evaluate + report."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint, n_layers
from itda.activations.models import load_model
from itda.atomic import write_text_atomic
from itda.builder import BuildConfig
from itda.builder.from_model import build_from_model
from itda.dictionary import Dictionary
from itda.evaluation.on_model import evaluate_contexts

DEMO_MODEL = "smollm2-135m"
DEMO_CONFIG = BuildConfig.choose()  # the defaults: k = 40, min cosine 0.85


@dataclass
class DemoResult:
    """What the demo made: its summary (also in report.json), the dictionary, the documents, the files written."""

    summary: dict
    dictionary: Dictionary
    docs: Sequence[str]
    dictionary_path: Path
    report_path: Path
    explorer_page: Path


def atom_snippet(docs: Sequence[str], refs_row: list[int], width: int = 40) -> str:
    """The atom's token in its document, marked with [[ ]], with some context either side."""
    doc, _pos, cs, ce, _tid = refs_row
    if doc < 0 or cs < 0:
        return "(no text reference)"
    text = docs[doc]
    left = text[max(0, cs - width) : cs].replace("\n", " ")
    right = text[ce : ce + width].replace("\n", " ")
    return f"...{left}[[{text[cs:ce]}]]{right}..."


def run_demo(
    out: Path, tokens: int, eval_tokens: int = 8192, model: str = DEMO_MODEL, layer: int | None = None
) -> DemoResult:
    """Build at `layer` (default: the middle block) from `tokens` tokens, evaluate held-out, write the
    report and explorer."""
    lm = load_model(model)
    layer = n_layers(lm.model) // 2 if layer is None else layer
    hp = Hookpoint("resid_post", layer)
    docs, contexts = load_contexts(
        "default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=tokens
    )
    result = build_from_model(lm, [hp], contexts, DEMO_CONFIG, corpus_name="default")
    dictionary = result.dictionaries[hp]
    out.mkdir(parents=True, exist_ok=True)
    dictionary.save(out / f"{hp.file_stem}.safetensors")

    t0 = time.perf_counter()
    _, held = load_contexts(
        "default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=eval_tokens
    )
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
    from itda.explorer.page import explorer_data, write_explorer
    from itda.explorer.run import view_on_model

    view = view_on_model(dictionary, label=hp.file_stem, lm=lm, model=model, tokens=eval_tokens, progress=False)
    page = write_explorer(out / "explorer", explorer_data([view]))
    return DemoResult(summary, dictionary, docs, out / f"{hp.file_stem}.safetensors", out / "report.json", page)


def demo_atoms(result: DemoResult) -> list[tuple[int, str]]:
    """(index, text snippet) of five atoms spread over the dictionary (all of them when it has fewer)."""
    n = len(result.dictionary)
    picks = [0, n // 4, n // 2, 3 * n // 4, n - 1] if n >= 5 else list(range(n))
    return [(i, atom_snippet(result.docs, result.dictionary.refs[i].tolist())) for i in picks]
