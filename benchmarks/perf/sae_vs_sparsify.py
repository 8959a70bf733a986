"""SAE training side by side with sparsify on the same cached activations: tokens/s of the SAE step,
held-out FVU at equal tokens, peak memory.

smollm2-135m resid_post at --layer (default 8), cached once (the default corpus: --tokens of its train
split, --heldout tokens of its held-out split). Each run is a child process (sampled for peak RssAnon and
VmHWM) training a TopK SAE of --latents latents, k = --k, on the same batches in the same order (batches
of --batch rows for --steps steps):

- `itda`: `itda.sae.SaeTrainer` at its defaults (Adam, lr 2e-3 / sqrt(F / 2^14), the encoder's gradient
  through the kept entries only); `itda lr xS`: the same with lr S x 2e-4 / sqrt(F / 2^14) (sparsify's Adam
  default and itda's before 2026-12-02), for S in --lr-scales: the sweep the default was chosen from;
- `sparsify`: sparsify 1.3's own Sae and its default optimiser as its Trainer sets them up (signum:
  ScheduleFreeWrapper(SignSGD, momentum 0.95), lr 5e-3 / sqrt(F / 2^14); b_dec = the first batch's mean;
  the gradient along decoder rows removed, decoder rows renormalised; no AuxK, its default), evaluated
  with the schedule-free averaged weights (`optimizer.eval()`, as sparsify saves them).

Held-out FVU for both: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 in float64 over the held-out rows.
Writes out/sae_vs_sparsify.json. Usage:
  python benchmarks/perf/sae_vs_sparsify.py [--layer 8] [--latents 4608] [--k 32] [--batch 1024] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, run_measured, write_result


def cache(layer: int, tokens: int, heldout: int) -> dict[str, Path]:
    """Activation files of smollm2-135m resid_post.layer for the train and held-out splits."""
    from itda.activations.corpus import load_contexts
    from itda.activations.files import save_activations
    from itda.activations.hookpoints import Hookpoint
    from itda.activations.models import load_model
    from itda.activations.stream import iterate_dense

    paths = {
        s: OUT / "sae_acts" / f"smollm2_L{layer}_{s}_{n}.safetensors"
        for s, n in (("train", tokens), ("heldout", heldout))
    }
    if all(p.exists() for p in paths.values()):
        return paths
    lm = load_model("smollm2-135m", max_layer=layer)
    for split, n in (("train", tokens), ("heldout", heldout)):
        _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split=split, tokens=n)
        rows = torch.cat(list(iterate_dense(lm.model, Hookpoint("resid_post", layer), ctx, batch_contexts=32)))
        save_activations(paths[split], rows[:n].half())
    return paths


def batches(x, batch: int, steps: int):
    """The same shuffled batches for every trainer (seed 0)."""
    from itda.sae.train import shuffled_batches

    it = shuffled_batches(x, batch, 0)
    return [next(it) for _ in range(steps)]


def heldout_fvu(reconstruct, held) -> float:
    x = held.double()
    err = sum(float((xb - reconstruct(xb.float()).double()).pow(2).sum()) for xb in x.split(4096))
    return err / float((x - x.mean(0)).pow(2).sum())


def run_itda(x, held, args, scale: float) -> dict:
    from itda.sae import SaeConfig, SaeTrainer, TrainConfig, new_sae
    from itda.sae.init import parse_init

    cfg = SaeConfig(x.shape[1], args.latents, args.k)
    sae, _ = new_sae(cfg, parse_init("kaiming"), x[:16384].float(), seed=0)
    config = TrainConfig(steps=args.steps, lr=None if scale == 0 else 2e-4 / (args.latents / 2**14) ** 0.5 * scale)
    trainer = SaeTrainer(sae, config)
    data = batches(x, args.batch, args.steps)
    t0 = time.perf_counter()
    for xb in data:
        trainer.step(xb.float())
    seconds = time.perf_counter() - t0
    sae.eval()
    with torch.no_grad():
        fvu = heldout_fvu(sae.reconstruct, held)
    return {"seconds": seconds, "heldout_fvu": fvu, "lr": trainer.lr, "optimizer": "adam"}


def run_sparsify(x, held, args) -> dict:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import Sae, SaeConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = Sae(x.shape[1], SaeConfig(num_latents=args.latents, k=args.k))
    lr = 5e-3 / (args.latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    data = batches(x, args.batch, args.steps)
    t0 = time.perf_counter()
    for i, xb in enumerate(data):
        xb = xb.float()
        if i == 0:
            sae.b_dec.data = xb.mean(0)
            sae.set_decoder_norm_to_unit_norm()
        out = sae(x=xb, y=xb, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        fvu_train = heldout_fvu(lambda xb: sae(x=xb, y=xb).sae_out, held)  # the iterate being trained
        opt.eval()  # the averaged weights, as sparsify saves them
        fvu = heldout_fvu(lambda xb: sae(x=xb, y=xb).sae_out, held)
    row = {"seconds": seconds, "heldout_fvu": fvu, "heldout_fvu_train_weights": fvu_train}
    return {**row, "lr": lr, "optimizer": "signum (schedule-free)"}


def child(args) -> None:
    from itda.activations.files import load_activations

    torch.manual_seed(0)
    x = load_activations(args.train).acts
    held = load_activations(args.held).acts
    row = run_sparsify(x, held, args) if args.child == "sparsify" else run_itda(x, held, args, args.scale)
    row["tokens"] = args.steps * args.batch
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--latents", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=204_800)
    ap.add_argument("--heldout", type=int, default=16_384)
    ap.add_argument("--lr-scales", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--child", choices=["itda", "sparsify"])
    ap.add_argument("--scale", type=float, default=0.0, help="0: itda's default lr")
    ap.add_argument("--train", type=Path)
    ap.add_argument("--held", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args)
    paths = cache(args.layer, args.tokens, args.heldout)
    common = [f"--{n}={getattr(args, n)}" for n in ("latents", "k", "batch", "steps")]
    common += [f"--train={paths['train']}", f"--held={paths['heldout']}"]
    rows = []
    runs = [("sparsify", ["--child=sparsify"]), ("itda", ["--child=itda"])]
    runs += [(f"itda lr x{s:g}", ["--child=itda", f"--scale={s}"]) for s in args.lr_scales]
    for name, extra in runs:
        res = run_measured([sys.executable, __file__, *extra, *common])
        if res["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{res['stderr'][-2000:]}")
        row = {"run": name, **json.loads(res["stdout"].strip().splitlines()[-1])}
        row.update(peak_rss_anon=res["peak_rss_anon"], vmhwm=res["vmhwm"])
        rows.append(row)
        print(
            f"| {name} | {row['optimizer']} | {row['lr']:.3g} | {row['tokens_per_s']:,.0f} | "
            f"{row['heldout_fvu']:.4f} | {row['peak_rss_anon'] / 2**30:.2f} GiB |",
            flush=True,
        )
    write_result("sae_vs_sparsify", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
