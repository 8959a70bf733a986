"""Layer-wise execution vs the in-memory forward vs accelerate disk offload, same model and tokens.

Builds (once, cached) a synthetic Llama-architecture checkpoint with random weights, bf16,
sharded: 16 blocks, d = 1024, MLP 2816 (~205M parameters). Each mode runs in a fresh process
so that its peak memory (VmHWM) is its own; every mode computes resid_post of the last block
for the same token batch in float32.
  in_memory     transformers from_pretrained, then forward passes of --pass-tokens tokens
  layerwise     itda LayerwiseModel, --pass-tokens tokens per pass
  offload_disk  transformers + accelerate device_map with every block on "disk"
The I/O floor is the bytes itda read divided by the read bandwidth measured on the shards.

Memory vs depth (--depth-layers): a second random Llama checkpoint made in a temporary folder
(24 blocks, d = 1024, MLP 4096, 16 heads, 4 KV heads, vocab 49,152, fp32: 61 MB per block,
200 MB shards, the packaged smollm2 tokenizer), then `itda build DIR --layer L --layerwise
--max-memory 0.4 --tokens 4000` in a child process per L, sampled every 5 ms: peak RssAnon and
VmHWM per depth. The layer-wise budget holds when they do not grow with L.
Usage: python benchmarks/perf/layerwise.py [--tokens 16384] [--pass-tokens 8192]
       python benchmarks/perf/layerwise.py --depth-only [--depth-layers 2 10 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.results import run_measured, write_result

from itda.activations.models import cache_root

CHILD = r"""
import contextlib, json, sys, time, torch
from itda.activations.hookpoints import Hookpoint, StopForward, capture

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folder, mode, offload_dir = sys.argv[1], sys.argv[2], sys.argv[5]
tokens, pass_tokens = int(sys.argv[3]), int(sys.argv[4])
ctx = 128
ids = torch.randint(0, 32000, (tokens // ctx, ctx), generator=torch.Generator().manual_seed(0))
base = rss("VmRSS")
t_load = time.perf_counter()
lw = None
if mode == "layerwise":
    from itda.activations.layerwise import LayerwiseModel
    lw = LayerwiseModel(folder, max_layer=15, micro_batch=8)
    model = lw.model
elif mode == "in_memory":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
else:
    from transformers import AutoModelForCausalLM
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(16)})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map,
                                                 offload_folder=offload_dir).eval()
load_s = time.perf_counter() - t_load
hp = Hookpoint("resid_post", 15)
per_pass = max(1, pass_tokens // ctx)
t0 = time.perf_counter()
checksum = 0.0
for s in range(0, ids.shape[0], per_pass):
    with torch.inference_mode(), capture(model, [hp]) as store, contextlib.suppress(StopForward):
        model(input_ids=ids[s:s + per_pass], use_cache=False)
    checksum += float(store[hp].double().sum())
run_s = time.perf_counter() - t0
print(json.dumps({"mode": mode, "tokens": tokens, "pass_tokens": pass_tokens, "load_s": load_s, "run_s": run_s,
                  "tokens_per_s": tokens / run_s, "peak_GiB": (rss("VmHWM")) / 2**30, "rss_at_start_GiB": base / 2**30,
                  "bytes_read": lw.bytes_read if lw else None, "checksum": checksum}))
"""


DEPTH_CHECKPOINT = "synthetic Llama, 24 blocks, d=1024, MLP 4096, 4 KV heads, fp32, 200 MB shards"


def make_checkpoint() -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = cache_root() / "bench" / "llama-synthetic-16x1024"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="100MB")
    return folder


def make_depth_checkpoint(folder: Path) -> Path:
    """24 random fp32 Llama blocks (d = 1024, MLP 4096) in 200 MB shards, with a tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from itda.activations.models import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49_152,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="200MB")
    load_model("smollm2-135m").tokenizer.save_pretrained(folder)  # ids inside the vocabulary
    return folder


def memory_vs_depth(layers: list[int]) -> list[dict]:
    """Peak RssAnon and VmHWM of `itda build --layerwise` to each layer, one process per layer."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_depth_checkpoint(Path(tmp) / "llama-24x1024")
        for layer in layers:
            cmd = [sys.executable, "-m", "itda", "build", str(folder), "--layer", str(layer), "--layerwise"]
            cmd += ["--max-memory", "0.4", "--tokens", "4000", "--out", str(Path(tmp) / f"out{layer}"), "-q"]
            res = run_measured(cmd, poll_s=0.005)
            row = {
                "layer": layer,
                "returncode": res["returncode"],
                "peak_rss_anon_MiB": res["peak_rss_anon"] / 2**20,
                "vmhwm_MiB": res["vmhwm"] / 2**20,
                "wall_s": res["seconds"],
            }
            rows.append(row)
            print(
                f"layer {layer:2d}: peak RssAnon {row['peak_rss_anon_MiB']:6.0f} MiB, "
                f"VmHWM {row['vmhwm_MiB']:6.0f} MiB, {row['wall_s']:.0f} s"
                + ("" if res["returncode"] == 0 else f" (failed: {res['stderr'][-300:]})"),
                flush=True,
            )
    return rows


def read_bandwidth(folder: Path) -> float:
    """Bytes/s reading the shards (after a first read warms the page cache, as in the runs)."""
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        f.read_bytes()
    t0 = time.perf_counter()
    total = sum(len(f.read_bytes()) for f in files)
    return total / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--pass-tokens", type=int, default=8192)
    parser.add_argument("--offload-pass-tokens", type=int, nargs="*", default=[8192, 1024])
    parser.add_argument("--depth-layers", type=int, nargs="*", default=[2, 10, 20])
    parser.add_argument("--depth-only", action="store_true", help="only the memory-vs-depth runs")
    args = parser.parse_args()
    depth = memory_vs_depth(args.depth_layers) if args.depth_layers else []
    if args.depth_only:
        print("wrote", write_result("layerwise_depth", {"checkpoint": DEPTH_CHECKPOINT, "depth": depth}))
        return
    folder = make_checkpoint()
    bw = read_bandwidth(folder)
    offload_dir = cache_root() / "bench" / "offload"
    script = Path(__file__).with_name("_layerwise_child.py")
    script.write_text(CHILD)
    runs = []
    plan = [("in_memory", args.pass_tokens), ("layerwise", args.pass_tokens), ("layerwise", 2048)]
    plan += [("offload_disk", p) for p in args.offload_pass_tokens]
    try:
        for mode, pt in plan:
            out = subprocess.run(
                [sys.executable, str(script), str(folder), mode, str(args.tokens), str(pt), str(offload_dir)],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(f"{mode}: failed\n{out.stderr[-2000:]}", flush=True)
                runs.append({"mode": mode, "pass_tokens": pt, "error": out.stderr.strip().splitlines()[-1]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(r)
            print(
                f"{mode:12s} pass {pt:5d} tokens: {r['tokens_per_s']:8.0f} tokens/s, load {r['load_s']:.1f}s, "
                f"peak {r['peak_GiB']:.2f} GiB",
                flush=True,
            )
    finally:
        script.unlink(missing_ok=True)
    mem = next(r for r in runs if r["mode"] == "in_memory")
    lw = next(r for r in runs if r["mode"] == "layerwise" and r["pass_tokens"] == args.pass_tokens)
    summary = {
        "layerwise_over_in_memory": lw["tokens_per_s"] / mem["tokens_per_s"],
        "checksums_equal": abs(lw["checksum"] - mem["checksum"]) <= 1e-6 * abs(mem["checksum"]) + 1e-3,
        "io_floor_s": lw["bytes_read"] / bw,
        "read_bandwidth_GBps": bw / 1e9,
    }
    for r in runs:
        if r["mode"] == "offload_disk" and "tokens_per_s" in r:
            summary[f"layerwise_over_offload_pass{r['pass_tokens']}"] = lw["tokens_per_s"] / r["tokens_per_s"]
    print(summary, flush=True)
    print(
        "wrote",
        write_result(
            "layerwise",
            {
                "checkpoint": "synthetic Llama, 16 blocks, d=1024, MLP 2816, bf16 shards",
                "runs": runs,
                "summary": summary,
                "depth_checkpoint": DEPTH_CHECKPOINT,
                "depth": depth,
            },
        ),
    )


if __name__ == "__main__":
    main()
