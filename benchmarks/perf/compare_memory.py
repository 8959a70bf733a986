"""Comparison memory and time: `itda compare A B` with the default measures, against the forward passes.

Grid rows: a model (its layers x width) against a copy of it with Gaussian noise on every block
weight matrix (`harness.suite.noisy_copy`, level --noise, seed 0), on the default corpus's
held-out split, for each of --tokens. Each row runs in a child process: both models loaded,
then `itda.comparison.compare_on_corpus` (what `itda compare A B` runs) with the default
measures; the child times the forward passes inside the comparison (every `forward_chunk` call:
two passes over both models) and reads its VmHWM from /proc/self/status; the parent samples its
RssAnon every 20 ms. Reported per row: peak VmHWM and RssAnon (and VmHWM with only the models
loaded), wall time of the comparison, forward time, their ratio, and the plan's estimators.

--synthetic adds the earlier case: two 80-layer d = 8192 "models" through MinibatchCKAGrid.
Writes out/compare_memory.json. Usage:
  python benchmarks/perf/compare_memory.py [--models smollm2-135m] [--tokens 4000 16000] [--noise 0.1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import run_measured, write_result

from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes

GiB = 2**30


def _status() -> dict[str, int]:
    """VmHWM and RssAnon of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "RssAnon:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def compare_child(model: str, tokens: int, noise: float) -> None:
    """One grid row in this process; prints one JSON line."""
    from harness.suite import noisy_copy

    import itda.comparison.passes as passes
    from itda.activations.models import load_model
    from itda.comparison import CompareConfig
    from itda.comparison.pipeline import compare_on_corpus

    lm = load_model(model)
    copy = noisy_copy(lm, noise)
    loaded = _status()
    forward = [0.0]
    original = passes.forward_chunk

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = original(*args, **kwargs)
        forward[0] += time.perf_counter() - t
        return out

    passes.forward_chunk = timed
    t0 = time.perf_counter()
    res = compare_on_corpus(lm, copy, config=CompareConfig(tokens=tokens), progress=False)
    wall = time.perf_counter() - t0
    plan = res.plan
    assert plan is not None  # compare_on_corpus always records its plan
    row = {
        "model": model,
        "layers": res.layers_a,
        "d": lm.config.hidden_size,
        "tokens": tokens,
        "paired_tokens": res.paired_tokens,
        "wall_s": wall,
        "forward_s": forward[0],
        "ratio": wall / forward[0],
        "vmhwm_models_loaded": loaded["VmHWM"],
        **{k.lower(): v for k, v in _status().items()},
        "estimators": {e.name: e.bytes for e in plan.estimators},
        "atoms": {
            "jaccard": sum(len(d) for d in res.dictionaries_a + res.dictionaries_b),
            "centred": sum(
                len(d) for b in (res.per_token_basis_a, res.per_token_basis_b) if b is not None for d in b.dictionaries
            ),
        },
        "notes": res.notes,
    }
    print(json.dumps(row), flush=True)


def synthetic_child(layers: int, d: int, m: int, minibatches: int) -> None:
    grid = MinibatchCKAGrid(m)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(minibatches):
        xs = [torch.randn(m, d, generator=gen) for _ in range(layers)]
        ys = [x + 0.5 * torch.randn(m, d, generator=gen) for x in xs]
        grid.update(xs, ys)
        del xs, ys
    s = grid.matrix()
    diag = float(s.diagonal().mean())
    off = float((s.sum() - s.diagonal().sum()) / (s.size - len(s)))
    print(json.dumps({"seconds": time.perf_counter() - t0, "diag": diag, "off": off}), flush=True)


def _row(cmd: list[str]) -> dict:
    res = run_measured([sys.executable, __file__, *cmd])
    if res["returncode"] != 0:
        return {"returncode": res["returncode"], "stderr": res["stderr"]}
    row = json.loads(res["stdout"].strip().splitlines()[-1])
    row["peak_rss_anon"] = res["peak_rss_anon"]
    row["vmhwm_sampled"] = res["vmhwm"]
    return row


def _line(row: dict) -> str:
    if "wall_s" not in row:
        return f"failed: {row}"
    return (
        f"| {row['model']} vs noise copy | {row['layers']} x {row['d']} | {row['tokens']:,} | "
        f"**{row['vmhwm'] / GiB:.2f} GiB** ({row['vmhwm_models_loaded'] / GiB:.2f} with the models alone) | "
        f"{row['peak_rss_anon'] / GiB:.2f} GiB | {row['wall_s']:.0f} s | {row['forward_s']:.0f} s | "
        f"**{row['ratio']:.2f}** |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4000, 16000])
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--synthetic", action="store_true", help="also the 80-layer d = 8192 MinibatchCKAGrid case")
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--child", choices=["compare", "synthetic"])
    args = ap.parse_args()
    if args.child == "compare":
        compare_child(args.models[0], args.tokens[0], args.noise)
        return
    if args.child == "synthetic":
        synthetic_child(args.layers, args.d, args.m, args.minibatches)
        return
    out: dict = {"noise": args.noise, "rows": []}
    print("| models | layers x d | tokens | VmHWM | peak RssAnon | wall | forward | wall / forward |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for model in args.models:
        for tokens in args.tokens:
            row = _row(["--child", "compare", "--models", model, "--tokens", str(tokens), "--noise", str(args.noise)])
            out["rows"].append(row)
            print(_line(row), flush=True)
    if args.synthetic:
        sizes = ["--layers", str(args.layers), "--d", str(args.d), "--m", str(args.m)]
        row = _row(["--child", "synthetic", *sizes, "--minibatches", str(args.minibatches)])
        row["exact_accumulators_GiB"] = exact_grid_bytes(args.layers, args.d, args.layers, args.d) / GiB
        out["synthetic"] = row
        print(row, flush=True)
    print("wrote", write_result("compare_memory", out))


if __name__ == "__main__":
    main()
