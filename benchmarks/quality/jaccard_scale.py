"""Does Jaccard need paper-scale token counts? Layer matching vs tokens seen (issue 9 research).

smollm2-135m (or --model gemma3-270m) vs its noise copy (noise on weight matrices,
layer_matching_suite.noisy_copy), every second layer; or --model seeds: the suite's four small GPT-2
seeds, every layer, all six pairs (the paper's Jaccard claim is across seeds). Per layer one ITDA
dictionary (improved mode, --k 40, --min-cosine 0.85) is built over
--tokens held-out tokens in stream order; ITDA only adds atoms, so the dictionary after the first
n tokens is the set of atoms whose source row is < n, and one build gives Jaccard (atom sets by
token) at every n. Linear CKA and Procrustes (exact streaming sums) at the same n, on the same
rows. Argmax accuracy without self-pairs, both directions.
Writes out/jaccard_scale.json (one entry per model, level, tokens).
Usage: python benchmarks/quality/jaccard_scale.py [--model smollm2-135m] [--tokens 32768] [--level 0.2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result
from harness.suite import SEED_LAYERS, SEEDS, copy_loss, held_contexts, hits, noisy_copy, samples

from itda.activations.hookpoints import n_layers
from itda.activations.models import load_model
from itda.comparison.itda_measures import dictionary_rows
from itda.comparison.per_token import unit_rows
from itda.comparison.streaming import StreamingCKAGrid


def atom_rows(x_ND: torch.Tensor, min_cosine: float, k: int = 40) -> torch.Tensor:
    return dictionary_rows(unit_rows(x_ND), k, min_cosine, 1024)


def jaccard_at(rows_a: list[torch.Tensor], rows_b: list[torch.Tensor], n: int) -> np.ndarray:
    sa = [set(r[r < n].tolist()) for r in rows_a]
    sb = [set(r[r < n].tolist()) for r in rows_b]
    return np.array([[len(a & b) / max(1, len(a | b)) for b in sb] for a in sa])


def seed_models(tokens: int):
    """The suite's four small GPT-2 seeds (trained and cached by it): every layer, all six pairs."""
    from harness.seed_models import model_dir, train_tokenizer
    from transformers import GPT2LMHeadModel

    from itda.activations.corpus import read_documents, split_documents
    from itda.activations.models import LoadedModel

    docs = read_documents("default")
    tok = train_tokenizer([docs[i] for i in split_documents(docs, "train")])
    acts, losses, ctx = {}, {}, None
    for s in range(SEEDS):
        path = model_dir(s, 1000, SEED_LAYERS, 128)
        if not (path / "config.json").exists():
            raise SystemExit(
                f"{path} missing: run quality/layer_matching_suite.py --benchmarks seeds first (it trains the seeds)"
            )
        lm = LoadedModel(f"seed{s}", GPT2LMHeadModel.from_pretrained(path).eval(), tok, path)
        ctx = ctx if ctx is not None else held_contexts(lm, tokens)
        acts[lm.name], losses[lm.name] = samples(lm, list(range(SEED_LAYERS)), ctx, tokens), copy_loss(lm, ctx)
    names = sorted(acts)
    return list(range(SEED_LAYERS)), acts, [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]], losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--level", type=float, default=0.2)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--min-cosine", type=float, default=0.85)
    ap.add_argument("--k", type=int, default=40, help="MP atoms per token")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or seeds (the suite's GPT-2 seeds)"
    )
    args = ap.parse_args()
    if args.model == "seeds":
        layers, acts, pairs, losses = seed_models(args.tokens)
        if acts["seed0"][0].shape[0] < args.tokens:
            print(f"the held-out split has {acts['seed0'][0].shape[0]} tokens; using them all", flush=True)
            args.tokens = acts["seed0"][0].shape[0]
    else:
        lm = load_model(args.model)
        layers = list(range(0, n_layers(lm.model), args.stride))
        ctx = held_contexts(lm, args.tokens)
        noisy = noisy_copy(lm, args.level, seed=args.noise_seed)
        t0 = time.perf_counter()
        acts = {"base": samples(lm, layers, ctx, args.tokens), "noisy": samples(noisy, layers, ctx, args.tokens)}
        pairs, losses = [("base", "noisy")], {"noisy": copy_loss(noisy, ctx)}
        print(f"activations: {time.perf_counter() - t0:.0f}s", flush=True)
    rows = {}
    for name, xs in acts.items():
        t0 = time.perf_counter()
        rows[name] = [atom_rows(x, args.min_cosine, args.k) for x in xs]
        print(f"{name}: {[len(r) for r in rows[name]]} atoms per layer, {time.perf_counter() - t0:.0f}s", flush=True)
    out = {
        "model": args.model,
        "level": args.level,
        "tokens": args.tokens,
        "min_cosine": args.min_cosine,
        "k": args.k,
        "noise_seed": args.noise_seed,
        "layers": layers,
        "copy_loss": losses,
        "pairs": pairs,
        "rows": {},
    }
    grids = {p: StreamingCKAGrid("float64") for p in pairs}
    seen = 0
    for n in [m for m in (2048 << i for i in range(20)) if m < args.tokens] + [args.tokens]:
        got = {"jaccard": [], "cka": [], "procrustes": []}
        for a, b in pairs:
            grids[a, b].update(torch.stack([x[seen:n] for x in acts[a]]), torch.stack([y[seen:n] for y in acts[b]]))
            mats = grids[a, b].matrices(procrustes=True)
            got["jaccard"].append(hits(jaccard_at(rows[a], rows[b], n)))
            got["cka"].append(hits(mats["cka"]))
            got["procrustes"].append(hits(mats["procrustes"]))
        seen = n
        out["rows"][n] = {m: float(np.concatenate(h).mean()) for m, h in got.items()}
        out["rows"][n]["atoms_a"] = int(np.mean([(r < n).sum() for r in rows[pairs[0][0]]]))
        print(n, out["rows"][n], flush=True)
    path = OUT / "jaccard_scale.json"
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    key = (
        f"seeds {args.tokens} {args.min_cosine}"
        if args.model == "seeds"
        else f"{args.model} {args.level} {args.tokens} {args.min_cosine} seed{args.noise_seed}"
    )
    runs[key + ("" if args.k == 40 else f" k{args.k}")] = out
    write_result("jaccard_scale", {"runs": runs})


if __name__ == "__main__":
    main()
