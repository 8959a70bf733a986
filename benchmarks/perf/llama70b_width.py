"""Layer-wise streaming at Llama-3-70B width, on this machine: a few real-shaped blocks, random weights.

Makes (once, under $ITDA_CACHE/bench) a checkpoint with Llama-3-70B's block shapes — d = 8192,
64 heads, 8 KV heads, MLP 28,672, vocab 128,256, bf16 — but `--blocks` blocks, sharded like
the real one (~5 GB per shard), then runs `itda build DIR --layer L --layerwise --max-memory M
--model-dtype bfloat16` on it in a subprocess and reports: peak anonymous memory (RssAnon),
VmHWM, bytes read per forward pass, tokens/s, and the per-block read and compute times that
the projection in RESULTS.md uses. Writes out/llama70b_width.json.
Usage: python benchmarks/perf/llama70b_width.py [--blocks 4] [--layer 2] [--tokens 1024] [--max-memory 6GB]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import OUT, run_measured, write_result

from itda.activations.models import cache_root

SHAPES = dict(
    hidden_size=8192,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28_672,
    vocab_size=128_256,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
)


def make_checkpoint(blocks: int) -> Path:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder = cache_root() / "bench" / f"llama70b-width-{blocks}blocks"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        num_hidden_layers=blocks,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
        **SHAPES,
    )
    cfg.save_pretrained(folder)
    d, kv, mlp = SHAPES["hidden_size"], SHAPES["num_key_value_heads"] * 128, SHAPES["intermediate_size"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.bfloat16).mul_(0.02)

    weight_map = {}
    shard = 0

    def write(tensors):
        nonlocal shard
        name = f"model-{shard:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        shard += 1

    write(
        {
            "model.embed_tokens.weight": rnd(SHAPES["vocab_size"], d),
            "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
        }
    )
    # one block's random tensors, written for every block (memory and I/O are what is measured)
    block = {
        "self_attn.q_proj.weight": rnd(d, d),
        "self_attn.k_proj.weight": rnd(kv, d),
        "self_attn.v_proj.weight": rnd(kv, d),
        "self_attn.o_proj.weight": rnd(d, d),
        "mlp.gate_proj.weight": rnd(mlp, d),
        "mlp.up_proj.weight": rnd(mlp, d),
        "mlp.down_proj.weight": rnd(d, mlp),
        "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
    }
    for i in range(blocks):
        write({f"model.layers.{i}.{k}": v for k, v in block.items()})
        print(f"wrote block {i}", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # any tokenizer with ids inside the vocabulary: the packaged smollm2 one (49,152 tokens)
    from itda.activations.models import load_model

    load_model("smollm2-135m").tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--max-memory", default="6GB")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = make_checkpoint(args.blocks)
    make_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    from safetensors import safe_open

    block_bytes = 0
    with safe_open(str(next(iter(sorted(folder.glob("model-00001.safetensors"))))), framework="pt") as fh:
        block_bytes = sum(math.prod(fh.get_slice(k).get_shape()) * 2 for k in fh.keys())
    out = OUT / "llama70b_width"
    cmd = [
        sys.executable,
        "-m",
        "itda",
        "build",
        str(folder),
        "--layer",
        str(args.layer),
        "--layerwise",
        "--max-memory",
        args.max_memory,
        "--model-dtype",
        "bfloat16",
        "--tokens",
        str(args.tokens),
        "--batch-tokens",
        str(args.batch_tokens),
        "--k",
        "40",
        "--out",
        str(out),
        "-q",
    ]
    res = run_measured(cmd)
    print(res["stdout"], res["stderr"][-500:])
    passes = math.ceil(args.tokens / args.batch_tokens)
    result = {
        "checkpoint_bytes": size,
        "block_bytes_bf16": block_bytes,
        "blocks": args.blocks,
        "layer": args.layer,
        "max_memory": args.max_memory,
        "tokens": args.tokens,
        "batch_tokens": args.batch_tokens,
        "bytes_read_per_pass": block_bytes * (args.layer + 1),
        "passes": passes,
        "make_checkpoint_s": make_s,
        "peak_rss_anon_GiB": res["peak_rss_anon"] / 2**30,
        "vmhwm_GiB": res["vmhwm"] / 2**30,
        "wall_s": res["seconds"],
        "returncode": res["returncode"],
        "cli_output": res["stdout"].strip().splitlines(),
    }
    print(json.dumps(result, indent=2))
    write_result("llama70b_width", result)


if __name__ == "__main__":
    main()
