"""Layer matching across seeds: small GPT-2-style models trained here, every measure side by side.

1. Trains a byte-level BPE tokenizer (4,096 tokens) and N GPT-2-style models (6 layers,
   d = 128) that differ only in their seed, on the default corpus's train split (cached under
   $ITDA_CACHE/bench; nothing large is committed; harness.seed_models).
2. For every pair of models (self-pairs included) computes [L x L] similarity matrices on
   held-out text with itda.comparison.pipeline.compare_models (one pass per pair).
3. Reports argmax layer-matching accuracy per measure, with and without self-pairs, the
   dictionary sizes per layer (why raw Jaccard can fail), and streaming-CKA throughput.
Usage: python benchmarks/quality/layer_matching.py [--models 3] [--steps 500] [--tokens 20000]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import write_result
from harness.seed_models import CONTEXT, train_model, train_tokenizer

from itda.activations.corpus import read_documents, split_documents
from itda.activations.models import LoadedModel
from itda.comparison.layers import pooled_accuracy
from itda.comparison.pipeline import compare_models
from itda.comparison.registry import DICTIONARY, KEPT_ROWS, STREAMED, names_of
from itda.comparison.streaming import StreamingCKAGrid

MEASURES = list(names_of(DICTIONARY, STREAMED, KEPT_ROWS))  # Jaccard and the baselines, in registry order


def cka_throughput(layers: int = 12, d: int = 768, tokens: int = 16384, batch: int = 4096) -> dict:
    """Streaming CKA for all L x L layer pairs of two GPT-2-small-shaped models, random data."""
    out = {}
    for precision in ("float64", "float32"):
        grid = StreamingCKAGrid(precision)
        gen = torch.Generator().manual_seed(0)
        xs = torch.randn(layers, batch, d, generator=gen)
        ys = torch.randn(layers, batch, d, generator=gen)
        t0 = time.perf_counter()
        for _ in range(tokens // batch):
            grid.update(xs, ys)
        upd = time.perf_counter() - t0
        t1 = time.perf_counter()
        grid.matrices(procrustes=False)
        fin = time.perf_counter() - t1
        acc_bytes = grid.xty.numel() * 8 + grid.a.gram.numel() * 8 * 2
        out[precision] = {
            "layers": layers,
            "d": d,
            "tokens": tokens,
            "tokens_per_s": tokens / upd,
            "finalise_s": fin,
            "accumulator_GiB": acc_bytes / 2**30,
        }
        print(
            f"streaming CKA {layers}x{layers} pairs, d={d}, {precision}: {tokens / upd:,.0f} tokens/s, "
            f"accumulators {acc_bytes / 2**30:.2f} GiB",
            flush=True,
        )
    out["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def atom_positions(lm, docs, held, tokens: int) -> None:
    """Per layer: atoms, median stream position of their tokens, fraction from the first 4,096 tokens."""
    from itda.activations.corpus import tokenize_contexts

    res = compare_models(lm, None, docs, held, tokens=tokens, measures=["jaccard"], context=CONTEXT, progress=False)
    ctx = tokenize_contexts(docs, held, lm.tokenizer, context=CONTEXT, max_tokens=tokens)
    text = ctx.refs[..., :2].reshape(-1, 2)
    text = text[text[:, 1] >= 0].tolist()
    order = {(d, p): i for i, (d, p) in enumerate(text)}
    rows = []
    for layer, d in enumerate(res.dictionaries_a):
        pos = np.array([order[(a, b)] for a, b in d.refs[:, :2].tolist()])
        rows.append(
            {
                "layer": layer,
                "atoms": len(d),
                "median_position": float(np.median(pos)),
                "fraction_in_first_4096": float((pos < 4096).mean()),
            }
        )
        print(rows[-1], flush=True)
    print("wrote", write_result("layer_matching_atom_positions", {"model": lm.name, "tokens": tokens, "rows": rows}))


SWEEP = [(40, 0.85), (8, 0.85), (8, 0.9), (4, 0.9), (40, 0.95)]


def jaccard_sweep(lms, docs, held, tokens: int) -> None:
    """Jaccard layer-matching accuracy and dictionary sizes as k and the threshold vary."""
    rows = []
    for k, cos in SWEEP:
        pairs: dict[str, dict] = {}
        sizes = []
        for i, j in itertools.combinations_with_replacement(range(len(lms)), 2):
            res = compare_models(
                lms[i],
                None if i == j else lms[j],
                docs,
                held,
                tokens=tokens,
                measures=["jaccard"],
                context=CONTEXT,
                k=k,
                min_cosine=cos,
                progress=False,
            )
            for name, m in res.matrices.items():
                pairs.setdefault(name, {})[(lms[i].name, lms[j].name)] = m
                if i != j:
                    pairs[name][(lms[j].name, lms[i].name)] = m.T
            sizes += [len(d) for d in res.dictionaries_a]
        row = {
            "k": k,
            "min_cosine": cos,
            "mean_atoms_per_layer": float(np.mean(sizes)),
            **{f"{name}_without_self": pooled_accuracy(p, self_pairs=False) for name, p in pairs.items()},
            **{f"{name}_with_self": pooled_accuracy(p, self_pairs=True) for name, p in pairs.items()},
        }
        rows.append(row)
        print(row, flush=True)
    print("wrote", write_result("layer_matching_jaccard_sweep", {"tokens_per_pair": tokens, "rows": rows}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--max-rows", type=int, default=4096)
    parser.add_argument(
        "--jaccard-sweep", action="store_true", help="only Jaccard, over (k, min cosine) settings, on the cached models"
    )
    parser.add_argument(
        "--atom-positions",
        action="store_true",
        help="only: where in the token stream seed 0's atoms come from (k=40, cosine 0.85)",
    )
    args = parser.parse_args()
    docs = read_documents("default")
    train_docs = [docs[i] for i in split_documents(docs, "train")]
    held = split_documents(docs, "heldout")
    tok = train_tokenizer(train_docs)
    paths = [train_model(seed, tok, train_docs, args.steps) for seed in range(args.models)]
    from transformers import GPT2LMHeadModel

    lms = [LoadedModel(f"seed{i}", GPT2LMHeadModel.from_pretrained(p).eval(), tok, p) for i, p in enumerate(paths)]
    if args.jaccard_sweep:
        jaccard_sweep(lms, docs, held, args.tokens)
        return
    if args.atom_positions:
        atom_positions(lms[0], docs, held, args.tokens)
        return
    pairs: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    sizes = {}
    t0 = time.perf_counter()
    for i, j in itertools.combinations_with_replacement(range(len(lms)), 2):
        res = compare_models(
            lms[i],
            None if i == j else lms[j],
            docs,
            held,
            tokens=args.tokens,
            measures=MEASURES,
            context=CONTEXT,
            max_rows=args.max_rows,
            progress=False,
        )
        for name, m in res.matrices.items():
            pairs.setdefault(name, {})[(lms[i].name, lms[j].name)] = m
            if i != j:
                pairs[name][(lms[j].name, lms[i].name)] = m.T
        sizes[lms[i].name] = [len(d) for d in res.dictionaries_a]
        sizes[lms[j].name] = [len(d) for d in res.dictionaries_b]
        print(f"pair {lms[i].name}-{lms[j].name}: {res.paired_tokens} tokens, {res.seconds:.0f}s", flush=True)
    compare_s = time.perf_counter() - t0
    accuracy = {
        name: {
            "with_self_pairs": pooled_accuracy(p, self_pairs=True),
            "without_self_pairs": pooled_accuracy(p, self_pairs=False),
        }
        for name, p in pairs.items()
    }
    for name, acc in sorted(accuracy.items(), key=lambda kv: -kv[1]["without_self_pairs"]):
        print(
            f"{name:14s} accuracy without self-pairs {acc['without_self_pairs']:.3f}, with {acc['with_self_pairs']:.3f}"
        )
    print("dictionary sizes per layer:", sizes)
    example = {name: p[("seed0", "seed1")].round(4).tolist() for name, p in pairs.items() if ("seed0", "seed1") in p}
    throughput = cka_throughput()
    print(
        "wrote",
        write_result(
            "layer_matching",
            {
                "models": args.models,
                "steps": args.steps,
                "arch": "GPT-2, 6 layers, d=128, 4 heads, BPE 4096, context 128",
                "tokens_per_pair": args.tokens,
                "accuracy": accuracy,
                "dictionary_sizes": sizes,
                "compare_seconds": compare_s,
                "seed0_vs_seed1": example,
                "streaming_cka": throughput,
            },
        ),
    )


if __name__ == "__main__":
    main()
