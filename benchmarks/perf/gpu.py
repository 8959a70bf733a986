"""The figures to take when a GPU is lent (CUDA only; exits with a message elsewhere).

1. Matching pursuit on CUDA vs one GEMM of the same shape (k = 40, B = 4096 tokens), with the
   Gram matrix given (the builder's case) and without it (the automatic path choice).
2. Build overhead over the forward pass: smollm2-135m layer 15 on CUDA, forward alone vs
   forward + improved-mode build, same tokens.
3. Layer-wise streaming with prefetch on CUDA: a synthetic 24-block Llama (d = 2048) in bf16,
   in-memory forward vs `--layerwise` (pinned double buffers, copy stream) tokens/s and peak
   GPU memory.
4. The SAE training step on CUDA, itda's trainer at its defaults vs sparsify's Sae with its default
   optimiser (as benchmarks/perf/sae_vs_sparsify.py runs them on CPU): tokens/s on the same random
   batches (d = 2304, 16,384 latents, k = 32, batches of 4,096 rows; speed only).
Writes out/gpu.json. Usage: python benchmarks/perf/gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import write_result


def sync() -> None:
    torch.cuda.synchronize()


def timed(fn, repeats: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def mp_vs_gemm(sizes) -> list[dict]:
    from itda.pursuit import compute_gram, matching_pursuit

    rows = []
    for d, n in sizes:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(4096, d, device="cuda", generator=g)
        atoms = torch.randn(n, d, device="cuda", generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        gram = compute_gram(atoms)
        gemm = timed(lambda x=x, atoms=atoms: x @ atoms.T)
        with_gram = timed(
            lambda x=x, atoms=atoms, gram=gram: matching_pursuit(x, atoms, 40, gram=gram, backend="torch")
        )
        auto = timed(lambda x=x, atoms=atoms: matching_pursuit(x, atoms, 40, backend="auto"))
        rows.append(
            {
                "d": d,
                "n_atoms": n,
                "gemm_s": gemm,
                "mp_gram_s": with_gram,
                "mp_auto_s": auto,
                "mp_gram_over_gemm": with_gram / gemm,
                "mp_auto_over_gemm": auto / gemm,
            }
        )
        print(rows[-1], flush=True)
    return rows


def build_overhead(tokens: int) -> dict:
    from itda.activations.corpus import load_contexts
    from itda.activations.hookpoints import Hookpoint
    from itda.activations.models import load_model
    from itda.activations.stream import iterate_batches
    from itda.builder import BuildConfig, DictionaryBuilder

    lm = load_model("smollm2-135m", device="cuda")
    hp = Hookpoint("resid_post", 15)
    _, ctx = load_contexts("default", lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="train", tokens=tokens)
    sync()
    t0 = time.perf_counter()
    n = sum(b[hp].unit.shape[0] for b in iterate_batches(lm.model, [hp], ctx, batch_contexts=32, device="cuda"))
    sync()
    fwd = time.perf_counter() - t0
    builder = DictionaryBuilder(lm.config.hidden_size, BuildConfig(k=40, min_cosine=0.85), device="cuda")
    t0 = time.perf_counter()
    for b in iterate_batches(lm.model, [hp], ctx, batch_contexts=32, device="cuda"):
        builder.update(b[hp].unit, b[hp].refs)
    sync()
    both = time.perf_counter() - t0
    return {
        "tokens": n,
        "forward_tok_s": n / fwd,
        "forward_build_tok_s": n / both,
        "overhead": both / fwd - 1,
        "atoms": builder.size,
    }


def layerwise(tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from itda.activations.hookpoints import Hookpoint, StopForward, capture
    from itda.activations.models import load_model

    folder = tempfile.mkdtemp()
    cfg = LlamaConfig(
        vocab_size=32_000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size="500MB")
    ids = torch.randint(4, 32_000, (tokens // 512, 512), device="cuda")
    hp = Hookpoint("resid_post", 23)
    out = {}
    for mode in ("in_memory", "layerwise"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        lm = load_model(folder, device="cuda", dtype=torch.bfloat16, layerwise=mode == "layerwise", max_layer=23)

        def run(model: torch.nn.Module) -> None:
            import contextlib

            with torch.inference_mode(), capture(model, [hp]), contextlib.suppress(StopForward):
                for s in range(0, ids.shape[0], 8):
                    model(input_ids=ids[s : s + 8], use_cache=False)

        secs = timed(functools.partial(run, lm.model), repeats=2)  # the partial goes with timed: lm frees below
        out[mode] = {"tok_s": ids.numel() / secs, "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30}
        print(mode, out[mode], flush=True)
        lm = None  # free it before the next mode
    return out


def sae_step(d: int = 2304, latents: int = 16_384, k: int = 32, batch: int = 4096, steps: int = 30) -> dict:
    from itda.sae import SaeConfig, SaeTrainer, TrainConfig, new_sae

    g = torch.Generator(device="cuda").manual_seed(0)
    data = [torch.randn(batch, d, device="cuda", generator=g) for _ in range(4)]
    sae, _ = new_sae(SaeConfig(d, latents, k), "kaiming", data[0][:4096], device="cuda", seed=0)
    trainer = SaeTrainer(sae, TrainConfig(steps=steps + 3))
    out = {"itda_tok_s": batch * steps / timed(lambda: [trainer.step(data[i % 4]) for i in range(steps)], 1)}
    try:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import Sae
        from sparsify import SaeConfig as SparsifyConfig
        from sparsify.sign_sgd import SignSGD
    except ImportError:
        return out
    ssae = Sae(d, SparsifyConfig(num_latents=latents, k=k), device="cuda")
    opt = ScheduleFreeWrapper(
        SignSGD([dict(params=ssae.parameters(), lr=5e-3 / (latents / 2**14) ** 0.5)]), momentum=0.95
    )
    opt.train()

    def sparsify_steps() -> None:
        for i in range(steps):
            ssae(x=data[i % 4], y=data[i % 4]).fvu.backward()
            ssae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            ssae.set_decoder_norm_to_unit_norm()

    out["sparsify_tok_s"] = batch * steps / timed(sparsify_steps, 1)
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: gpu.py measures CUDA paths only")
        sys.exit(0)
    sizes = (
        [(2048, 4096), (4096, 16_384)]
        if args.quick
        else [(576, 4096), (2048, 4096), (2048, 16_384), (4096, 16_384), (8192, 50_000)]
    )
    res = {"device": torch.cuda.get_device_name(), "mp_vs_gemm": mp_vs_gemm(sizes)}
    res["build_overhead"] = build_overhead(20_000 if args.quick else 100_000)
    res["layerwise"] = layerwise(4096 if args.quick else 32_768)
    res["sae_step"] = sae_step(steps=10 if args.quick else 30)
    print("wrote", write_result("gpu", res))


if __name__ == "__main__":
    main()
