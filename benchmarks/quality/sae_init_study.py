"""SAE initialisations at a useful budget: held-out FVU vs training tokens, per init, layer and seed.

Layers: smollm2-135m resid_post 8 and 15, gemma3-270m resid_post 9 (each with the layer below,
the source of `transfer`). Their activations are cached once per machine (`--cache-only`;
deterministic: the default corpus's train split for training, its held-out split for FVU and
the CE-loss score). Each run trains a TopK SAE (8 x d latents, k = 32, batches of 1,024 tokens,
itda's default Adam learning rate, AuxK) for `--train-tokens` tokens, passing over the cache
as many times as that takes, and records the held-out FVU every `--eval-every` steps, the dead
latents (no firing in the last 1M training tokens; never firing on the held-out tokens) and
the CE-loss score at the end. Every run is one JSON file in benchmarks/results/sae_init_study/
(committed): runs already there are skipped, so the grid fills in over several sessions and a
killed run is simply run again. `--summarise` writes the tables (steps and wall time to
kaiming's final FVU, final FVU, dead latents, CE-loss score) and the FVU-vs-tokens plots.

Usage:
  python benchmarks/quality/sae_init_study.py --cache-only
  python benchmarks/quality/sae_init_study.py [--layers smollm2-135m:15] [--inits kaiming itda] [--seeds 0 1 2]
  python benchmarks/quality/sae_init_study.py --summarise
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT

from itda.sae import TrainConfig

LAYERS = ("smollm2-135m:8", "smollm2-135m:15", "gemma3-270m:9")
ROW_INITS = ("kaiming", "orthogonal", "data", "mean-subtracted", "centroid-subtracted", "outliers")
# ITDA variants: dictionary threshold, atoms centred by b_dec, what fills latents beyond the atoms
ITDA_VARIANTS = {
    "itda": {"min_cosine": 0.9, "centre_atoms": True, "fill": "data"},  # itda sae train's default
    "itda-raw": {"min_cosine": 0.9, "centre_atoms": False, "fill": "data"},  # the rule before 2026-12-03
    "itda-outfill": {"min_cosine": 0.9, "centre_atoms": False, "fill": "outliers"},
    "itda-centred-outfill": {"min_cosine": 0.9, "centre_atoms": True, "fill": "outliers"},
    "itda-0.95": {"min_cosine": 0.95, "centre_atoms": True, "fill": "outliers"},
    # the encoder at half and twice its least-squares scale
    "itda-enc0.5": {"min_cosine": 0.9, "centre_atoms": True, "fill": "data", "encoder_gain": 0.5},
    "itda-enc2": {"min_cosine": 0.9, "centre_atoms": True, "fill": "data", "encoder_gain": 2.0},
    # built on activations minus their geometric median: gemma3's raw activations are all near one direction
    "itda-cbuild": {"min_cosine": 0.9, "centre_atoms": False, "fill": "data", "build_centred": True},
}
INITS = (*ROW_INITS, *ITDA_VARIANTS, "transfer")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "sae_init_study"
ACTS = OUT / "sae_study_acts"
IMG = Path(__file__).resolve().parents[2] / "docs" / "img" / "sae"


@dataclass(frozen=True)
class Budget:
    """One run's settings (stored in every result; a result with other settings is not reused)."""

    train_tokens: int = 5_000_000
    cache_tokens: int = 524_288
    eval_tokens: int = 8_192
    ce_tokens: int = 4_096
    batch: int = 1_024
    expansion: int = 8
    k: int = 32
    eval_every: int = 244  # steps: 20 evaluations over 5M tokens
    init_sample: int = 16_384
    lr_decay: float = TrainConfig.lr_decay  # the fraction of the last steps the learning rate falls to 0 over
    lr_warmup_steps: int = TrainConfig.lr_warmup_steps

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch

    @property
    def tag(self) -> str:
        """The results folder's name: the token count, and the schedule when it is not constant."""
        decay = f"_decay{self.lr_decay:g}" if self.lr_decay else ""
        return f"{self.train_tokens}_tokens{decay}" + (f"_warmup{self.lr_warmup_steps}" if self.lr_warmup_steps else "")

    def same_as(self, stored: dict) -> bool:
        """Whether a recorded run's budget is this one (runs recorded before the schedule fields: constant)."""
        return {"lr_decay": 0.0, "lr_warmup_steps": 0, **stored} == asdict(self)


def results_dir(budget: Budget) -> Path:
    return RESULTS / budget.tag


def act_path(model: str, layer: int, split: str, n: int) -> Path:
    return ACTS / f"{model}_L{layer}_{split}_{n}.safetensors"


def cache_model(model: str, layers: list[int], budget: Budget) -> None:
    """Activation files of each layer and the layer below it, both splits, one forward pass per split."""
    from itda.activations.corpus import load_contexts
    from itda.activations.files import save_activations
    from itda.activations.hookpoints import Hookpoint
    from itda.activations.models import load_model
    from itda.activations.stream import iterate_batches

    wanted = sorted({L for layer in layers for L in (layer - 1, layer)})
    lm = None
    for split, n in (("train", budget.cache_tokens), ("heldout", budget.eval_tokens)):
        todo = [L for L in wanted if not act_path(model, L, split, n).exists()]
        if not todo:
            continue
        lm = lm or load_model(model)
        _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split=split, tokens=n)
        hps = [Hookpoint("resid_post", L) for L in todo]
        parts: dict = {hp: [] for hp in hps}
        t0 = time.perf_counter()
        for batch in iterate_batches(lm.model, hps, ctx, batch_contexts=32, dtype=torch.float32):
            for hp in hps:
                parts[hp].append(batch[hp].dense())
        for hp in hps:
            x = torch.cat(parts[hp])[:n]
            fits_fp16 = bool(x.abs().max() < torch.finfo(torch.float16).max)  # gemma3's stream does not
            save_activations(act_path(model, hp.layer, split, n), x.half() if fits_fp16 else x)
        print(f"{model} {split}: {n} tokens x layers {todo} in {time.perf_counter() - t0:.0f}s", flush=True)


def cache_all(layers: list[str], budget: Budget) -> None:
    by_model: dict[str, list[int]] = {}
    for model, L in map(_split, layers):
        by_model.setdefault(model, []).append(L)
    for model, Ls in by_model.items():
        cache_model(model, Ls, budget)


def load_split(model: str, layer: int, split: str, budget: Budget) -> torch.Tensor:
    from itda.activations.files import load_activations

    n = budget.cache_tokens if split == "train" else budget.eval_tokens
    return load_activations(act_path(model, layer, split, n)).acts.float()


def itda_dictionary(
    model: str, layer: int, min_cosine: float, budget: Budget, centred: bool = False
) -> tuple[Path, float, int]:
    """The ITDA dictionary of the cached training tokens, or of them minus their geometric median when
    `centred` (built once; its build time kept beside it)."""
    from itda.builder import build_dictionary
    from itda.dictionary import Dictionary
    from itda.sae.init import geometric_median

    path = ACTS / f"itda_{model}_L{layer}_{min_cosine}{'_centred' if centred else ''}.safetensors"
    timing = path.with_suffix(".json")
    if path.exists() and timing.exists():
        return path, json.loads(timing.read_text())["build_s"], len(Dictionary.load(path))
    x = load_split(model, layer, "train", budget)
    t0 = time.perf_counter()
    if centred:
        x = x - geometric_median(x[: budget.init_sample])
    d = build_dictionary(x.split(4096), k=budget.k, min_cosine=min_cosine, max_atoms=budget.expansion * x.shape[1])
    build_s = time.perf_counter() - t0
    d.meta.hookpoint, d.meta.model = f"blocks.{layer}.hook_resid_post", model
    d.save(path)
    timing.write_text(json.dumps({"build_s": build_s}))
    return path, build_s, len(d)


def source_path(layer: str, budget: Budget) -> Path:
    """The kaiming seed-0 SAE of a layer at this budget, kept as the next layer's transfer source."""
    return ACTS / f"sae_{run_id(layer, 'kaiming', 0)}_{budget.tag.replace('_tokens', '')}.safetensors"


def run_id(layer: str, init: str, seed: int) -> str:
    model, L = layer.split(":")
    return f"{model}_L{L}_{init}_s{seed}"


def init_spec(model: str, layer: int, init: str, budget: Budget) -> tuple[str, dict, float]:
    """The `new_sae` spec and options of an init, and its one-off cost not paid per run (an ITDA build)."""
    options = {"b_dec": "median", "fill": "data", "crop": True}
    if init in ITDA_VARIANTS:
        v = ITDA_VARIANTS[init]
        path, build_s, _ = itda_dictionary(model, layer, v["min_cosine"], budget, v.get("build_centred", False))
        gain = {"encoder_gain": v["encoder_gain"]} if "encoder_gain" in v else {}
        return f"itda:{path}", {**options, "fill": v["fill"], "centre_atoms": v["centre_atoms"], **gain}, build_s
    if init == "transfer":
        source = source_path(f"{model}:{layer - 1}", budget)
        if not source.exists():
            run_one(f"{model}:{layer - 1}", "kaiming", 0, budget)
        return f"transfer:{source}", options, 0.0
    return init, options, 0.0


def train_run(x_train, x_held, spec: str, options: dict, seed: int, budget: Budget):
    """Train one SAE; returns it, the trainer and the held-out FVU curve [(tokens, fvu)]."""
    from itda.sae import SaeConfig, SaeTrainer, evaluate_sae, new_sae, shuffled_batches

    d = x_train.shape[1]
    gen = torch.Generator().manual_seed(seed)
    sample = x_train[torch.randperm(x_train.shape[0], generator=gen)[: budget.init_sample]]
    t0 = time.perf_counter()
    sae, info = new_sae(SaeConfig(d, budget.expansion * d, budget.k), spec, sample, seed=seed, **options)
    init_s = time.perf_counter() - t0
    schedule = {"lr_decay": budget.lr_decay, "lr_warmup_steps": budget.lr_warmup_steps}
    trainer = SaeTrainer(sae, TrainConfig(steps=budget.steps, seed=seed, **schedule))
    held = x_held.split(4096)
    curve = [(0, evaluate_sae(sae, held).fvu)]
    eval_s = [0.0]

    def record(tr, stats):
        if stats.step % budget.eval_every == 0 or stats.step == budget.steps:
            te = time.perf_counter()
            curve.append((stats.step * budget.batch, evaluate_sae(tr.sae, held).fvu))
            eval_s[0] += time.perf_counter() - te

    t1 = time.perf_counter()
    trainer.fit(shuffled_batches(x_train, budget.batch, seed), progress=False, callback=record)
    train_s = time.perf_counter() - t1 - eval_s[0]
    return sae, trainer, curve, {"init_s": init_s, "train_s": train_s, "info": info}


def ce_score(model: str, layer: int, sae, budget: Budget) -> float:
    from itda.activations.corpus import load_contexts
    from itda.activations.hookpoints import Hookpoint
    from itda.activations.models import load_model
    from itda.evaluation.on_model import evaluate_contexts
    from itda.sae import SaeMeta
    from itda.sae.io import LoadedSae

    lm = load_model(model)
    hp = Hookpoint("resid_post", layer)
    _, ctx = load_contexts(
        "default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=budget.ce_tokens
    )
    return evaluate_contexts(lm, LoadedSae(sae, SaeMeta(hookpoint=hp.name)), hp, ctx).ce.score


def run_one(layer: str, init: str, seed: int, budget: Budget, threads: int | None = None) -> dict:
    """Train, score and record one run (skipped when its result with these settings exists)."""
    from itda.sae import evaluate_sae, save_sae

    if threads:
        torch.set_num_threads(threads)
    path = results_dir(budget) / f"{run_id(layer, init, seed)}.json"
    if path.exists() and budget.same_as(json.loads(path.read_text())["budget"]):
        return json.loads(path.read_text())
    model, L = _split(layer)
    spec, options, once_s = init_spec(model, L, init, budget)
    x_train, x_held = load_split(model, L, "train", budget), load_split(model, L, "heldout", budget)
    sae, trainer, curve, t = train_run(x_train, x_held, spec, options, seed, budget)
    if init == "kaiming" and seed == 0:
        save_sae(sae, source_path(layer, budget))  # a transfer source
    result = {
        "layer": layer,
        "init": init,
        "seed": seed,
        "budget": asdict(budget),
        "options": options,
        "curve": curve,
        "final_fvu": curve[-1][1],
        "dead_train": int(trainer.dead_mask().sum()),
        "dead_heldout": evaluate_sae(sae, x_held.split(4096)).dead_latents,
        "ce_loss_score": ce_score(model, L, sae, budget),
        "init_s": t["init_s"],
        "once_s": once_s,
        "train_s": t["train_s"],
        "atoms": t["info"].get("atoms"),
        "encoder_scale": t["info"].get("encoder_scale"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(
        f"{path.stem}: final FVU {result['final_fvu']:.4f}, dead {result['dead_train']}, "
        f"CE {result['ce_loss_score']:.4f}, {t['train_s']:.0f}s",
        flush=True,
    )
    return result


def _commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return out.stdout.strip()


def run_grid(
    layers: list[str], inits: list[str], seeds: list[int], budget: Budget, jobs: int, threads: int | None = None
) -> None:
    """Runs in order seed-major (every init at seed 0 first), `jobs` at a time, each on `threads` threads
    (default cores / jobs)."""
    todo = [(layer, init, seed) for seed in seeds for layer in layers for init in inits]
    cache_all(layers, budget)
    for layer in layers:
        for init in {i for _, i, _ in todo if i in ITDA_VARIANTS}:
            v = ITDA_VARIANTS[init]
            itda_dictionary(*_split(layer), v["min_cosine"], budget, v.get("build_centred", False))
    sources = [(f"{m}:{L - 1}", "kaiming", 0) for m, L in map(_split, layers)] if "transfer" in inits else []
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for group in (sources, todo):  # transfer sources first: a transfer run needs its source SAE
            futures = {pool.submit(run_one, *job, budget, threads): job for job in group}
            for f, job in futures.items():
                if f.exception() is not None:  # reported, and the other runs go on
                    print(f"{run_id(*job)} failed: {f.exception()!r}", flush=True)


def _split(layer: str) -> tuple[str, int]:
    model, L = layer.split(":")
    return model, int(L)


def results_of(layer: str, budget: Budget) -> dict[str, list[dict]]:
    """The recorded runs of a layer at this budget, by init, in seed order."""
    runs: dict[str, list[dict]] = {}
    for init in INITS:
        for path in sorted(results_dir(budget).glob(f"{run_id(layer, init, 0)[:-1]}*.json")):
            r = json.loads(path.read_text())
            if budget.same_as(r["budget"]) and r["init"] == init:
                runs.setdefault(init, []).append(r)
    return runs


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    return [(t, sum(r["curve"][i][1] for r in runs) / len(runs)) for i, (t, _) in enumerate(runs[0]["curve"])]


def tokens_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """First training-token count where the curve reaches target, linearly interpolated."""
    for (t0, f0), (t1, f1) in zip(curve, curve[1:], strict=False):
        if f0 <= target:
            return float(t0)
        if f1 <= target:
            return t0 + (f0 - target) / (f0 - f1) * (t1 - t0)
    return None


def layer_table(runs: dict[str, list[dict]], budget: Budget) -> tuple[list[dict], float]:
    """Per init: tokens and wall time to kaiming's mean final FVU (and as ratios), final FVU, dead, CE."""
    target = sum(r["final_fvu"] for r in runs["kaiming"]) / len(runs["kaiming"])
    s_token = sorted(r["train_s"] / budget.train_tokens for rs in runs.values() for r in rs)
    s_token = s_token[len(s_token) // 2]  # one SAE, one cost per token: the median of all runs
    base = tokens_to(mean_curve(runs["kaiming"]), target)
    rows = []
    for init, rs in runs.items():
        tok = tokens_to(mean_curve(rs), target)
        cost = rs[0]["once_s"] + sum(r["init_s"] for r in rs) / len(rs)
        rows.append(
            {
                "init": init,
                "seeds": len(rs),
                "tokens": tok,
                "ratio": tok / base if tok is not None and base else None,
                "wall_s": None if tok is None else cost + tok * s_token,
                "final": [r["final_fvu"] for r in rs],
                "dead_train": [r["dead_train"] for r in rs],
                "dead_heldout": [r["dead_heldout"] for r in rs],
                "ce": [r["ce_loss_score"] for r in rs],
            }
        )
    base_wall = next(r["wall_s"] for r in rows if r["init"] == "kaiming")
    for r in rows:
        r["wall_ratio"] = r["wall_s"] / base_wall if r["wall_s"] is not None and base_wall else None
    return rows, target


def _fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def _millions(tokens: float | None) -> str:
    return "never" if tokens is None else f"{tokens / 1e6:.2f}M"


def summarise(layers: list[str], budget: Budget) -> None:
    """Print a markdown table per layer and plot its FVU-vs-tokens curves (docs/img/sae/)."""
    for layer in layers:
        runs = results_of(layer, budget)
        if "kaiming" not in runs:
            print(f"{layer}: no kaiming run at this budget yet")
            continue
        rows, target = layer_table(runs, budget)
        print(f"\n**{layer}**: target (kaiming mean final FVU) {target:.4f}\n")
        print(
            "| init | seeds | tokens to target | × kaiming | wall s | × kaiming | final FVU (mean) | seeds "
            "| dead (train) | never fire (held-out) | CE-loss score |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            mean = sum(r["final"]) / len(r["final"])
            print(
                f"| {r['init']} | {r['seeds']} | {_millions(r['tokens'])} "
                f"| {_fmt(r['ratio'])} | {_fmt(r['wall_s'], '.0f')} | {_fmt(r['wall_ratio'])} | {mean:.4f} "
                f"| {', '.join(f'{f:.4f}' for f in r['final'])} | {', '.join(map(str, r['dead_train']))} "
                f"| {', '.join(map(str, r['dead_heldout']))} | {', '.join(f'{c:.4f}' for c in r['ce'])} |"
            )
        plot_layer(layer, runs, target, budget)


def plot_layer(layer: str, runs: dict[str, list[dict]], target: float, budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for init, rs in runs.items():
        tok, fvu = zip(*mean_curve(rs), strict=True)
        ax.plot([t / 1e6 for t in tok], fvu, label=f"{init} ({len(rs)})", lw=2 if init in ("kaiming", "itda") else 1.1)
    ax.axhline(target, color="k", ls="--", lw=0.8, label="kaiming final")
    ax.set(yscale="log", xlabel="training tokens (millions)", ylabel="held-out FVU (mean of seeds)")
    ax.set_title(f"{layer.replace(':', ' layer ')}: TopK SAE by initialisation")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / f"sae_init_study_{layer.replace(':', '_L')}_{budget.tag.replace('_tokens', '')}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", nargs="+", default=list(LAYERS), help="MODEL:LAYER")
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-tokens", type=int, default=Budget.train_tokens)
    ap.add_argument("--eval-every", type=int, default=Budget.eval_every, help="steps between held-out evaluations")
    ap.add_argument("--lr-decay", type=float, default=Budget.lr_decay, help="TrainConfig.lr_decay")
    ap.add_argument("--lr-warmup-steps", type=int, default=Budget.lr_warmup_steps, help="TrainConfig.lr_warmup_steps")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each on cores / jobs threads)")
    ap.add_argument("--threads", type=int, help="threads per run (two grids side by side: 1 each)")
    ap.add_argument("--cache-only", action="store_true")
    ap.add_argument("--summarise", action="store_true", help="tables and plots of the recorded runs")
    args = ap.parse_args()
    budget = Budget(
        train_tokens=args.train_tokens,
        eval_every=args.eval_every,
        lr_decay=args.lr_decay,
        lr_warmup_steps=args.lr_warmup_steps,
    )
    if args.summarise:
        summarise(args.layers, budget)
    elif args.cache_only:
        cache_all(args.layers, budget)
    else:
        run_grid(args.layers, args.inits, args.seeds, budget, args.jobs, args.threads)


if __name__ == "__main__":
    main()
