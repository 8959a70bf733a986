"""The README's main job on the embedded default data (synthetic activations until models land)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from itda.atomic import write_text_atomic
from itda.build import build_dictionary
from itda.evaluate import evaluate
from itda.synthetic import synthetic_activations

DEMO_D = 256
DEMO_K = 40
DEMO_MIN_COSINE = 0.85


def run_demo(out: Path, tokens: int, batch_size: int = 4096) -> dict:
    held_out = max(tokens // 5, 1)
    data = synthetic_activations(tokens + held_out, DEMO_D, seed=0)
    t0 = time.perf_counter()
    dictionary = build_dictionary(
        data.batches(batch_size, stop=tokens), k=DEMO_K, min_cosine=DEMO_MIN_COSINE, progress=True, total_tokens=tokens
    )
    build_s = time.perf_counter() - t0
    dictionary.meta.model = "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    dictionary.save(out / "dictionary.safetensors")
    report = evaluate(dictionary, (x for x, _ in data.batches(batch_size, start=tokens)))
    summary = {**report.summary(), "build_seconds": build_s, "build_tokens_per_s": tokens / build_s}
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2))
    typer.echo(f"dictionary: {len(dictionary)} atoms (d={DEMO_D}, k={DEMO_K}, min cosine {DEMO_MIN_COSINE}) from {tokens} tokens")
    typer.echo(f"build: {build_s:.1f}s, {tokens / build_s:,.0f} tokens/s")
    typer.echo(
        f"held-out ({report.tokens} tokens): FVU {report.fvu:.4f}, mean cosine {report.mean_cosine:.4f}, "
        f"L0 {report.l0:.1f}, dead atoms {report.dead_atoms}"
    )
    typer.echo(f"wrote {out / 'dictionary.safetensors'} and {out / 'report.json'}")
    return summary
