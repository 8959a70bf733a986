"""SAE training with the model forward on the fly, side by side with sparsify: wall time, tokens/s of the
training loop, held-out FVU at equal steps, peak memory.

smollm2-135m resid_post of block --layer (default 8: hidden_states[9] in transformers' terms, sparsify's
hookpoint `layers.8`), a TopK SAE of --latents latents, k = --k, --steps steps of --batch tokens, each tool
at its own defaults for the optimiser and the learning rate. Each run is a child process (sampled for peak
RssAnon and VmHWM) that loads the model itself (itda's load_model: the same weights and dtype for both):

- `itda`: `itda.train_sae(model="smollm2-135m", layer=..., init="kaiming", ...)`, itda's own pipeline: the
  default corpus's train split in contexts of 128 tokens, forwards cut after the hookpoint's block, special
  tokens (BOS, padding) dropped, rows regrouped into batches of exactly --batch; b_dec the geometric median
  of its 16,384-row init sample; Adam at its default lr;
- `sparsify`: sparsify 1.3's own `Trainer` (loss fvu, its defaults: signum, i.e. schedule-free SignSGD at
  lr 5e-3 / sqrt(F / 2^14), b_dec = the first batch's mean, no AuxK) driven from Python as its __main__
  builds it for loss fvu (the base model without the LM head, `AutoModel`), on the same contexts in the same
  order (the first steps x batch / 128 contexts itda packs, as an `input_ids` Dataset, batch_size = batch / 128
  sequences, not shuffled), the token ids the contexts mark special excluded from training through its
  `exclude_tokens`, so a batch trains on fewer than --batch tokens: one BOS per context, and the padding
  of documents' short last windows (~18% of the tokens over 40 steps of the default corpus); with
  --full-contexts, the first unpadded contexts only (1016 of 1024 tokens trained per batch: a stream that
  skips itda's padded contexts). Its full 30-block forward per batch. Evaluated as it saves the
  SAE (the schedule-free averaged weights).

Setup outside sparsify's own code: the Trainer is constructed directly instead of through its CLI (whose
model loading asks for `cuda:0`), and wandb logging is off. On a CPU-only torch sparsify falls back by
itself to its eager decoder (no Triton) and to no bf16 autocast.

Wall: model load to trained SAE written (end to end); train: the training loop (itda: on_start to the
return of train_sae, which writes the SAE; sparsify: Trainer.fit, which saves its run folder).
tokens/s = tokens trained / train seconds; the FVUs compare equal steps, not equal tokens. Held-out FVU
for both (heldout_fvu of sae_vs_sparsify.py): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 in float64 over
--heldout held-out rows (cached by its cache()).
Writes out/sae_forward_vs_sparsify.json (SAEs under out/sae_forward/). Usage:
  python benchmarks/perf/sae_forward_vs_sparsify.py [--layer 8] [--latents 4608] [--k 32] [--batch 1024]
      [--steps 40] [--heldout 16384] [--full-contexts]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/perf/, for sae_vs_sparsify
from harness.results import OUT, run_measured, write_result
from sae_vs_sparsify import cache, heldout_fvu

MODEL = "smollm2-135m"
RUNS = OUT / "sae_forward"


def held_rows(path: Path, device) -> torch.Tensor:
    from itda.activations.files import load_activations

    return load_activations(path).acts.to(device)


def run_itda(args) -> dict:
    import itda

    loop: list[float] = []
    t0 = time.perf_counter()
    loaded = itda.train_sae(
        latents=args.latents,
        model=MODEL,
        layer=args.layer,
        k=args.k,
        steps=args.steps,
        batch_size=args.batch,
        init="kaiming",
        progress=False,
        out=RUNS / f"itda_L{args.layer}_{args.steps}.safetensors",
        on_start=lambda trainer, info: loop.append(time.perf_counter()),
    )
    t1 = time.perf_counter()
    sae = loaded.sae.eval()
    with torch.no_grad():
        fvu = heldout_fvu(sae.reconstruct, held_rows(args.held, sae.W_dec.device))
    train = loaded.meta.train
    row = {"wall_seconds": t1 - t0, "seconds": t1 - loop[0], "tokens": int(train["tokens"])}
    return {**row, "heldout_fvu": fvu, "lr": float(train["lr"]), "optimizer": "adam"}


def sparsify_data(lm, args):
    """The first steps x (batch / context) contexts of itda's train split as the Dataset sparsify's Trainer
    reads (an input_ids column), the token ids those contexts mark special, and the tokens trained and forwarded."""
    from datasets import Dataset

    from itda.activations.corpus import load_contexts

    tokens = args.steps * args.batch * (2 if args.full_contexts else 1)  # padded contexts dropped: read more
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=tokens)
    context, rows = ctx.input_ids.shape[1], args.steps * (args.batch // ctx.input_ids.shape[1])
    if args.batch % context:
        raise SystemExit(f"--batch {args.batch} is not a whole number of {context}-token contexts")
    ids = ctx.input_ids[ctx.attention_mask.bool().all(1)] if args.full_contexts else ctx.input_ids
    if len(ids) < rows:
        raise SystemExit(f"{len(ids)} contexts, fewer than the {rows} needed")
    ids = ids[:rows]
    special = sorted(set(ctx.input_ids[ctx.special].tolist()))
    counts = {"tokens": int(torch.isin(ids, torch.tensor(special), invert=True).sum()), "tokens_forwarded": ids.numel()}
    return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch"), special, counts


def run_sparsify(args) -> dict:
    from sparsify import SaeConfig, SparseCoder
    from sparsify.trainer import TrainConfig, Trainer

    from itda.activations.models import load_model

    t0 = time.perf_counter()
    lm = load_model(MODEL)
    data, special, counts = sparsify_data(lm, args)
    name = f"sparsify_L{args.layer}_{args.steps}"
    cfg = TrainConfig(
        SaeConfig(num_latents=args.latents, k=args.k),
        batch_size=len(data) // args.steps,
        hookpoints=[f"layers.{args.layer}"],
        exclude_tokens=special,
        log_to_wandb=False,
        save_dir=str(RUNS),
        run_name=name,
    )
    trainer = Trainer(cfg, data, lm.model.base_model)  # AutoModel's module: __main__'s model for loss fvu
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    t1 = time.perf_counter()
    trainer.fit()
    t2 = time.perf_counter()
    sae = SparseCoder.load_from_disk(RUNS / name / f"layers.{args.layer}", device=lm.device)
    with torch.no_grad():
        fvu = heldout_fvu(lambda xb: sae(x=xb, y=xb).sae_out, held_rows(args.held, lm.device))
    row = {"wall_seconds": t2 - t0, "seconds": t2 - t1, **counts}
    return {**row, "heldout_fvu": fvu, "lr": lr, "optimizer": "signum (schedule-free)", "excluded_ids": special}


def child(args) -> None:
    torch.manual_seed(0)
    row = run_sparsify(args) if args.child == "sparsify" else run_itda(args)
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    print(json.dumps(row))


def measure(name: str, cmd: list[str]) -> dict:
    res = run_measured(cmd)
    if res["returncode"] != 0:
        raise SystemExit(f"{name} failed:\n{res['stderr'][-2000:]}")
    row = {"run": name, **json.loads(res["stdout"].strip().splitlines()[-1])}
    row.update(peak_rss_anon=res["peak_rss_anon"], vmhwm=res["vmhwm"])
    print(
        f"| {name} | {row['optimizer']} | {row['lr']:.3g} | {row['tokens']:,} | {row['seconds']:.1f} | "
        f"{row['wall_seconds']:.1f} | {row['tokens_per_s']:,.0f} | {row['heldout_fvu']:.4f} | "
        f"{row['peak_rss_anon'] / 2**30:.2f} GiB | {row['vmhwm'] / 2**30:.2f} GiB |",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--latents", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--heldout", type=int, default=16_384)
    ap.add_argument("--full-contexts", action="store_true", help="sparsify: itda's unpadded contexts only")
    ap.add_argument("--child", choices=["itda", "sparsify"])
    ap.add_argument("--held", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args)
    held = cache(args.layer, args.batch, args.heldout)["heldout"]  # (its train file, one batch, is unused)
    common = [f"--{n}={getattr(args, n)}" for n in ("layer", "latents", "k", "batch", "steps")] + [f"--held={held}"]
    common += ["--full-contexts"] if args.full_contexts else []
    print("| tool | optimiser | lr | tokens | train s | wall s | tokens/s | held-out FVU | peak RssAnon | VmHWM |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = [measure(name, [sys.executable, __file__, f"--child={name}", *common]) for name in ("itda", "sparsify")]
    write_result("sae_forward_vs_sparsify", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
