"""`itda demo`'s report on the terminal (itda.demo makes the data)."""

from __future__ import annotations

import typer

from itda.demo import DEMO_CONFIG, DemoResult, demo_atoms


def print_demo(result: DemoResult) -> None:
    """The demo's summary, some atoms with their text, and the files it wrote."""
    s = result.summary
    typer.echo("")
    typer.echo(
        f"model {s['model']}, {s['hookpoint']}: {s['dictionary_size']} atoms "
        f"(k={DEMO_CONFIG.k}, min cosine {DEMO_CONFIG.min_cosine})"
    )
    typer.echo(
        f"built from {s['build_tokens']:,} tokens in {s['build_seconds']:.0f}s "
        f"({s['build_tokens_per_s']:,.0f} tokens/s, forward {s['forward_seconds']:.0f}s)"
    )
    typer.echo(
        f"held-out {s['tokens']:,} tokens: FVU {s['fvu']:.3f}, mean cosine {s['mean_cosine']:.3f}, L0 {s['l0']:.1f}, "
        f"dead atoms {s['dead_atoms']}"
    )
    typer.echo(
        f"CE-loss score {s['ce_loss_score']:.3f} (CE clean {s['ce_clean']:.3f}, spliced {s['ce_spliced']:.3f}, "
        f"zero-ablated {s['ce_zero']:.3f})"
    )
    typer.echo("some atoms and the text they came from:")
    for i, snippet in demo_atoms(result):
        typer.echo(f"  atom {i:6d}: {snippet}")
    typer.echo(f"wrote {result.dictionary_path}, {result.report_path} and the atom explorer {result.explorer_page}")
