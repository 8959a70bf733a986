"""End-to-end build on smollm2-135m: forward alone vs forward + build, and quality as tokens grow.

Same settings for both runs: layer 15 resid_post, k = 40, min cosine 0.85 (the CLI default),
contexts of 128 tokens from the default corpus, 4096 tokens per forward pass, fp16 stream.
Quality snapshots every 100k tokens: dictionary size, FVU and CE-loss score on held-out text.
Usage: python benchmarks/perf/build_pipeline.py [--tokens 210000] [--compare-tokens 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import write_result

from itda.activations.corpus import load_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import load_model
from itda.activations.stream import iterate_batches
from itda.builder import BuildConfig, DictionaryBuilder
from itda.evaluation.on_model import evaluate_contexts

STEP = 100_000


def evaluate_snapshot(lm, dictionary, hp, held) -> dict:
    report = evaluate_contexts(lm, dictionary, hp, held)
    rep, ce = report.recon, report.ce
    return {
        "size": len(dictionary),
        "fvu": rep.fvu,
        "mean_cosine": rep.mean_cosine,
        "l0": rep.l0,
        "ce_loss_score": ce.score,
        "ce_clean": ce.ce_clean,
        "ce_spliced": ce.ce_spliced,
        "ce_zero": ce.ce_zero,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=210_000)
    parser.add_argument("--compare-tokens", type=int, default=100_000)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    lm = load_model(args.model)
    hp = Hookpoint("resid_post", args.layer)
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=args.tokens)
    _, held = load_contexts(
        "default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=args.eval_tokens
    )
    n_cmp = args.compare_tokens // 127 + 1  # contexts holding about compare_tokens text tokens
    batch_contexts = 4096 // 128

    t0 = time.perf_counter()
    fwd_tokens = sum(
        b[hp].unit.shape[0] for b in iterate_batches(lm.model, [hp], ctx.rows(0, n_cmp), batch_contexts=batch_contexts)
    )
    fwd_s = time.perf_counter() - t0
    print(f"forward only: {fwd_tokens} tokens in {fwd_s:.1f}s = {fwd_tokens / fwd_s:,.0f} tokens/s", flush=True)

    builder = DictionaryBuilder(lm.config.hidden_size, BuildConfig(k=40, min_cosine=0.85))
    build_s, tokens, next_snap, cmp_s = 0.0, 0, STEP, None
    snapshots = []
    t_last = time.perf_counter()
    for i, batch in enumerate(iterate_batches(lm.model, [hp], ctx, batch_contexts=batch_contexts)):
        builder.update(batch[hp].unit, batch[hp].refs)
        tokens += batch[hp].unit.shape[0]
        now = time.perf_counter()
        build_s += now - t_last
        if cmp_s is None and (i + 1) * batch_contexts >= n_cmp:
            cmp_s, cmp_tokens = build_s, tokens
            print(
                f"forward + build: {cmp_tokens} tokens in {cmp_s:.1f}s = {cmp_tokens / cmp_s:,.0f} tokens/s", flush=True
            )
        if tokens >= next_snap:
            snap = {"tokens": tokens, **evaluate_snapshot(lm, builder.dictionary(), hp, held)}
            snapshots.append(snap)
            print(snap, flush=True)
            next_snap += STEP
        t_last = time.perf_counter()
    fwd_rate, build_rate = fwd_tokens / fwd_s, cmp_tokens / cmp_s
    overhead = fwd_rate / build_rate - 1
    print(f"build adds {100 * overhead:.1f}% on top of the forward pass", flush=True)
    print(
        "wrote",
        write_result(
            "build_pipeline",
            {
                "model": args.model,
                "hookpoint": hp.name,
                "k": 40,
                "min_cosine": 0.85,
                "forward_tokens_per_s": fwd_rate,
                "build_tokens_per_s": build_rate,
                "build_overhead": overhead,
                "compare_tokens": cmp_tokens,
                "eval_tokens": int((~held.special).sum()),
                "snapshots": snapshots,
            },
        ),
    )


if __name__ == "__main__":
    main()
