"""SAE initialisations on real activations: steps and wall time to a held-out FVU target.

smollm2-135m resid_post at two layers (default 8 and 15) plus the layer before each (for
layer transfer), cached once to activation files (default corpus: train split for training,
held-out split for evaluation). For each layer and seed, TopK SAEs of `--expansion` x d
latents, k = 32, the same steps, batch, learning rate and b_dec rule (geometric median) are
trained from each initialisation; held-out FVU is measured every `--eval-every` steps.

Target: the mean final held-out FVU of `kaiming` (sparsify's default). Reported per init: the
steps to reach it (first evaluation at or below it; linear interpolation between evaluations),
that as a ratio of kaiming's, the wall time to it including the init's own cost (the ITDA
build for `itda`, the k-means for `centroid-subtracted`; the source SAE of `transfer` is
trained once on the previous layer and, as in layer-wise transfer, not counted), and the
final FVU. Also: ITDA alone (MP, k = 32) vs the trained SAEs on the same held-out tokens:
FVU, CE-loss score, wall time. Writes out/sae_init.json and out/sae_init_L*.png.
Usage: python benchmarks/quality/sae_init.py [--layers 8 15] [--seeds 3] [--steps 400] [--tokens 131072]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, write_result

from itda.activations.corpus import load_contexts
from itda.activations.files import load_activations, save_activations
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import load_model
from itda.activations.stream import iterate_batches
from itda.builder import build_dictionary
from itda.evaluation.on_model import evaluate_contexts
from itda.evaluation.report import evaluate
from itda.sae import SaeConfig, SaeMeta, SaeTrainer, TrainConfig, evaluate_sae, new_sae, save_sae, shuffled_batches
from itda.sae.io import LoadedSae

INITS = ("kaiming", "orthogonal", "data", "mean-subtracted", "centroid-subtracted", "outliers", "itda", "transfer")


def cache_activations(lm, layers: list[int], tokens: int, eval_tokens: int) -> dict:
    """Activation files per layer and split, made in one forward pass per split."""
    paths = {}
    hps = [Hookpoint("resid_post", L) for L in layers]
    for split, n in (("train", tokens), ("heldout", eval_tokens)):
        files = {L: OUT / "sae_acts" / f"smollm2_L{L}_{split}_{n}.safetensors" for L in layers}
        paths.update({(L, split): p for L, p in files.items()})
        if all(p.exists() for p in files.values()):
            continue
        _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split=split, tokens=n)
        parts = {hp: [] for hp in hps}
        t0 = time.perf_counter()
        for batch in iterate_batches(lm.model, hps, ctx, batch_contexts=32, dtype=torch.float32):
            for hp in hps:
                parts[hp].append(batch[hp].dense().half())
        for hp in hps:
            save_activations(files[hp.layer], torch.cat(parts[hp]))
        print(
            f"cached {split}: {sum(x.shape[0] for x in parts[hps[0]])} tokens x {len(hps)} layers "
            f"in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    return paths


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where the curve reaches target, linearly interpolated between evaluations."""
    prev = None
    for step, fvu in curve:
        if fvu <= target:
            if prev is None or prev[1] == fvu:
                return float(step)
            (s0, f0) = prev
            return s0 + (f0 - target) / (f0 - fvu) * (step - s0)
        prev = (step, fvu)
    return None


def train_one(spec: str, x_train, x_held, args, seed: int, resample: str | None = None):
    cfg = SaeConfig(x_train.shape[1], args.expansion * x_train.shape[1], args.k)
    t0 = time.perf_counter()
    sample = x_train[
        torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))[: args.init_sample]
    ]
    sae, info = new_sae(cfg, spec, sample, seed=seed, b_dec="median", fill="data", crop=True)
    init_s = time.perf_counter() - t0
    trainer = SaeTrainer(
        sae,
        TrainConfig(
            steps=args.steps,
            lr=args.lr,
            dead_after_tokens=args.dead_after,
            resample=resample,
            resample_every=args.resample_every,
            seed=seed,
        ),
    )
    held = x_held.split(8192)
    curve = [(0, evaluate_sae(sae, held).fvu)]
    step_s = []

    def on_step(tr, stats):
        if stats.step % args.eval_every == 0:
            curve.append((stats.step, evaluate_sae(tr.sae, held).fvu))

    t1 = time.perf_counter()
    eval_s = [0.0]

    def timed(tr, stats):
        te = time.perf_counter()
        on_step(tr, stats)
        eval_s[0] += time.perf_counter() - te

    trainer.fit(shuffled_batches(x_train, args.batch_size, seed), progress=False, callback=timed)
    train_s = time.perf_counter() - t1 - eval_s[0]
    step_s = train_s / args.steps
    return sae, {
        "init_s": init_s,
        "s_per_step": step_s,
        "curve": curve,
        "final_fvu": curve[-1][1],
        "dead_final": int(trainer.dead_mask().sum()),
        "resampled": trainer.resampled_total,
        "encoder_scale": info.get("encoder_scale"),
        "atoms": info.get("atoms"),
    }


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [st for st, _ in runs[0]["curve"]]
    return [(st, sum(r["curve"][i][1] for r in runs) / len(runs)) for i, st in enumerate(steps)]


def summarise(runs: dict[str, list[dict]], itda_s: float) -> tuple[dict, float]:
    """Per init: steps (on the seed-mean curve, and per seed) to kaiming's mean final FVU, wall time, final FVU.

    Wall time = the init's own cost (+ the ITDA build for `itda`) + steps x the median seconds
    per step of all runs of the layer (every init trains the same SAE, so one per-step cost;
    the median discounts runs slowed by other work on the machine).
    """
    target = sum(r["final_fvu"] for r in runs["kaiming"]) / len(runs["kaiming"])
    all_steps = sorted(r["s_per_step"] for rs in runs.values() for r in rs)
    s_step = all_steps[len(all_steps) // 2]
    kaiming_steps = steps_to(mean_curve(runs["kaiming"]), target)
    table = {}
    for name, rs in runs.items():
        extra = itda_s if name == "itda" else 0.0
        init_s = sum(r["init_s"] for r in rs) / len(rs) + extra
        steps = steps_to(mean_curve(rs), target)
        table[name] = {
            "steps_to_target": steps,
            "steps_to_target_seeds": [steps_to(r["curve"], target) for r in rs],
            "steps_ratio_vs_kaiming": steps / kaiming_steps if steps is not None and kaiming_steps else None,
            "wall_s_to_target": None if steps is None else init_s + steps * s_step,
            "init_s": init_s,
            "final_fvu_mean": sum(r["final_fvu"] for r in rs) / len(rs),
            "final_fvu_seeds": [r["final_fvu"] for r in rs],
            "dead_final": [r["dead_final"] for r in rs],
            "resampled": [r["resampled"] for r in rs],
        }
    base_wall = table["kaiming"]["wall_s_to_target"]
    for row in table.values():
        row["wall_ratio_vs_kaiming"] = (
            row["wall_s_to_target"] / base_wall if row["wall_s_to_target"] and base_wall else None
        )
    return table, target


def plot(layer: int, results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        mean = [sum(r["curve"][i][1] for r in runs) / len(runs) for i in range(len(steps))]
        ax.plot(steps, mean, label=name, lw=2 if name in ("kaiming", "itda") else 1.2)
    ax.axhline(target, color="k", ls="--", lw=0.8, label="target (kaiming final)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out FVU (mean of seeds)")
    ax.set_title(f"smollm2-135m layer {layer}: TopK SAE by initialisation")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 15])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=131_072)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ce-tokens", type=int, default=4096)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--init-sample", type=int, default=16_384)
    ap.add_argument(
        "--dead-after", type=int, default=204_800, help="tokens without firing before a latent counts as dead"
    )
    ap.add_argument("--resample-every", type=int, default=100)
    ap.add_argument("--itda-min-cosine", type=float, default=0.9)
    ap.add_argument("--inits", nargs="+", default=list(INITS))
    ap.add_argument("--resample-inits", nargs="*", default=["kaiming"], help="inits also run with ITDA resampling")
    ap.add_argument("--name", default="sae_init", help="result file name (out/NAME.json)")
    ap.add_argument("--no-versus", action="store_true", help="skip the ITDA-alone vs SAE comparison")
    ap.add_argument("--summarise", action="store_true", help="only recompute the tables and plots of out/sae_init.json")
    args = ap.parse_args()
    if args.summarise:
        import json

        report = json.loads((OUT / f"{args.name}.json").read_text())
        for layer, rep in report["layers"].items():
            rep["table"], rep["target_fvu"] = summarise(rep["runs"], rep["itda_build_s"])
            plot(int(layer), rep["runs"], rep["target_fvu"], OUT / f"{args.name}_L{layer}.png")
            for name, row in rep["table"].items():
                print(
                    f"L{layer} {name:22s} steps {row['steps_to_target']} ratio {row['steps_ratio_vs_kaiming']} "
                    f"wall {row['wall_s_to_target']} ({row['wall_ratio_vs_kaiming']}) final {row['final_fvu_mean']:.4f}"
                )
        (OUT / f"{args.name}.json").write_text(json.dumps(report, indent=2))
        return
    lm = load_model("smollm2-135m")
    all_layers = sorted({L for L in args.layers} | {L - 1 for L in args.layers})
    paths = cache_activations(lm, all_layers, args.tokens, args.eval_tokens)
    _, ce_ctx = load_contexts(
        "default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout", tokens=args.ce_tokens
    )
    report = {"settings": vars(args), "layers": {}}
    for layer in args.layers:
        x_train = load_activations(paths[(layer, "train")]).acts.float()
        x_held = load_activations(paths[(layer, "heldout")]).acts.float()
        x_prev = load_activations(paths[(layer - 1, "train")]).acts.float()
        hp = Hookpoint("resid_post", layer)
        # ITDA dictionary on the same training tokens (timed: counted in the itda rows)
        t0 = time.perf_counter()
        dictionary = build_dictionary(
            x_train.split(4096), k=args.k, min_cosine=args.itda_min_cosine, max_atoms=args.expansion * x_train.shape[1]
        )
        itda_s = time.perf_counter() - t0
        dictionary.meta.hookpoint, dictionary.meta.model = hp.name, "smollm2-135m"
        dict_path = OUT / "sae_acts" / f"itda_L{layer}.safetensors"
        dictionary.save(dict_path)
        print(f"layer {layer}: ITDA {len(dictionary)} atoms in {itda_s:.1f}s", flush=True)
        # source SAE for layer transfer: the previous layer, kaiming init, seed 0, same budget
        t0 = time.perf_counter()
        prev_path = OUT / "sae_acts" / f"sae_kaiming_L{layer - 1}.safetensors"
        if "transfer" in args.inits:
            prev_held = load_activations(paths[(layer - 1, "heldout")]).acts.float()
            prev_sae, _ = train_one("kaiming", x_prev, prev_held, args, 0)
            save_sae(prev_sae, prev_path)
        prev_s = time.perf_counter() - t0
        specs = {
            "kaiming": "kaiming",
            "orthogonal": "orthogonal",
            "data": "data",
            "mean-subtracted": "mean-subtracted",
            "centroid-subtracted": "centroid-subtracted",
            "outliers": "outliers",
            "itda": f"itda:{dict_path}",
            "transfer": f"transfer:{prev_path}",
        }
        runs: dict[str, list[dict]] = {}
        best: dict[str, object] = {}
        for name in args.inits + [f"{i}+resample-itda" for i in args.resample_inits]:
            base_name = name.split("+")[0]
            spec, resample = specs[base_name], ("itda" if "+resample" in name else None)
            for seed in range(args.seeds):
                sae, r = train_one(spec, x_train, x_held, args, seed, resample)
                runs.setdefault(name, []).append(r)
                if seed == 0:
                    best[name] = sae
                print(
                    f"L{layer} {name:22s} seed {seed}: final FVU {r['final_fvu']:.4f} "
                    f"({r['s_per_step']:.3f}s/step, init {r['init_s']:.1f}s, dead {r['dead_final']})",
                    flush=True,
                )
        if "kaiming" not in runs:  # a partial run (e.g. resampling only): compare with its first init
            runs = {"kaiming": runs[args.inits[0]], **runs}
        table, target = summarise(runs, itda_s)
        # ITDA alone vs trained SAEs on the same held-out tokens (FVU at k, CE-loss score)
        if args.no_versus:
            report["layers"][str(layer)] = {
                "target_fvu": target,
                "itda_atoms": len(dictionary),
                "itda_build_s": itda_s,
                "table": table,
                "runs": runs,
            }
            write_result(args.name, report)
            continue
        t0 = time.perf_counter()
        itda_eval = evaluate(dictionary, x_held.split(4096), k=args.k)
        itda_eval_s = time.perf_counter() - t0
        versus = {
            "itda_alone": {
                "fvu": itda_eval.fvu,
                "l0": itda_eval.l0,
                "atoms": len(dictionary),
                "build_s": itda_s,
                "ce_loss_score": evaluate_contexts(lm, dictionary, hp, ce_ctx, k=args.k).ce.score,
                "encode_s_heldout": itda_eval_s,
            }
        }
        for name in ("kaiming", "itda"):
            rep = evaluate_contexts(lm, LoadedSae(best[name], SaeMeta(hookpoint=hp.name)), hp, ce_ctx)
            versus[f"sae_{name}_seed0"] = {
                "fvu": table[name]["final_fvu_seeds"][0],
                "ce_loss_score": rep.ce.score,
                "train_s": args.steps * runs[name][0]["s_per_step"] + table[name]["init_s"],
            }
        report["layers"][str(layer)] = {
            "target_fvu": target,
            "itda_atoms": len(dictionary),
            "itda_build_s": itda_s,
            "transfer_source_s": prev_s,
            "table": table,
            "itda_vs_sae": versus,
            "runs": runs,
        }
        plot(layer, runs, target, OUT / f"{args.name}_L{layer}.png")
        print(f"layer {layer}: target FVU {target:.4f}", flush=True)
        for name, row in table.items():
            print(
                f"  {name:22s} steps {row['steps_to_target']}  ratio {row['steps_ratio_vs_kaiming']}  "
                f"final {row['final_fvu_mean']:.4f}",
                flush=True,
            )
        print(f"  versus: {versus}", flush=True)
        write_result(args.name, report)


if __name__ == "__main__":
    main()
