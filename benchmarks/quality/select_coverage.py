"""Atom coverage of data selection on the default corpus: greedy max-coverage and its variants
against random and longest-first choices, as coverage curves (PNG) and a table.

    python benchmarks/quality/select_coverage.py [--build-tokens 50000] [--layer 15] [--budget 300]
        [--max-doc-tokens 256]

A smollm2-135m dictionary is built on the train split of the default corpus (once, cached in
out/); the candidates are the held-out documents (each read up to --max-doc-tokens tokens);
each document's support is the set of atoms that are among its tokens' --support-atoms strongest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result

from itda.activations.corpus import default_corpus, split_documents
from itda.activations.hookpoints import parse_hookpoint
from itda.activations.models import load_model
from itda.dictionary import Dictionary
from itda.selection.coverage import coverage_curve, random_order, select_documents
from itda.selection.run import RANDOM_DRAWS, plot_curves
from itda.selection.supports import document_supports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-tokens", type=int, default=50_000)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--max-doc-tokens", type=int, default=256)
    ap.add_argument("--min-cosine", type=float, default=0.9, help="of the dictionary build")
    ap.add_argument("--support-atoms", type=int, default=4)
    args = ap.parse_args()
    folder = OUT / f"select_dict_l{args.layer}_{args.build_tokens}_c{args.min_cosine}"
    path = folder / f"resid_post.{args.layer}.safetensors"
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "itda",
                "build",
                "smollm2-135m",
                "--layer",
                str(args.layer),
                "--tokens",
                str(args.build_tokens),
                "--min-cosine",
                str(args.min_cosine),
                "--out",
                str(folder),
                "-q",
            ],
            check=True,
        )
    d = Dictionary.load(path)
    lm = load_model("smollm2-135m")
    docs = default_corpus()
    ids = split_documents(docs, "heldout")
    t0 = time.perf_counter()
    sup = document_supports(
        lm,
        d,
        parse_hookpoint(d.meta.hookpoint),
        docs,
        ids,
        k=d.meta.k,
        support_atoms=args.support_atoms,
        max_doc_tokens=args.max_doc_tokens,
    )
    supports_s = time.perf_counter() - t0
    budget = min(args.budget, len(ids))
    curves, times = {}, {}
    for name in ("greedy", "simscale", "complexity", "longest"):
        t0 = time.perf_counter()
        order = select_documents(sup.sets, budget, name, doc_tokens=sup.tokens)
        times[name] = time.perf_counter() - t0
        curves[name] = coverage_curve(sup.sets, order)
    curves["random"] = np.stack(
        [coverage_curve(sup.sets, random_order(len(ids), budget, s)) for s in range(RANDOM_DRAWS)]
    ).mean(0)
    used = int((np.asarray(sup.sets.sum(0)).ravel() > 0).sum())
    png = OUT / "select_coverage.png"
    plot_curves(curves, used, png, f"smollm2-135m layer {args.layer}, {len(d)} atoms; {len(ids)} held-out documents")
    marks = [b for b in (10, 25, 50, 100, 200, 300) if b <= budget]
    table = {name: {str(b): float(c[b - 1]) / used for b in marks} for name, c in curves.items()}
    for name, row in table.items():
        print(f"{name:10s} " + "  ".join(f"{b}: {100 * v:5.1f}%" for b, v in row.items()))
    tokens_at = {
        name: int(sup.tokens[select_documents(sup.sets, budget, name, doc_tokens=sup.tokens)].sum())
        for name in ("greedy", "simscale", "complexity", "longest")
    }
    out = write_result(
        "select_coverage",
        {
            "layer": args.layer,
            "atoms": len(d),
            "documents": len(ids),
            "corpus_tokens": int(sup.tokens.sum()),
            "atoms_used_by_corpus": used,
            "max_doc_tokens": args.max_doc_tokens,
            "min_cosine": args.min_cosine,
            "support_atoms": args.support_atoms,
            "budget": budget,
            "supports_s": supports_s,
            "select_s": times,
            "coverage_share": table,
            "tokens_chosen": tokens_at,
            "png": str(png.relative_to(OUT.parent)),
        },
    )
    print(
        f"supports {supports_s:.0f}s over {int(sup.tokens.sum())} tokens; corpus uses {used} of {len(d)} atoms; "
        f"wrote {out}, {png}"
    )


if __name__ == "__main__":
    main()
