"""The small GPT-2-style models the layer-matching benchmarks train: a byte-level BPE tokenizer
(4,096 tokens) and models that differ only in their seed, on the default corpus's train split,
cached under $ITDA_CACHE/bench (nothing large is committed)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from itda.activations.models import cache_root

CONTEXT = 128


def bench_dir() -> Path:
    d = cache_root() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = bench_dir() / "bpe4096.json"
    if not path.exists():
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=4096,
            special_tokens=["<|bos|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(docs, trainer)
        tok.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|bos|>", pad_token="<|pad|>")


def model_dir(seed: int, steps: int, layers: int = 6, d: int = 128, at: int | None = None) -> Path:
    name = f"gpt2-l{layers}-d{d}-seed{seed}-steps{steps}"
    return bench_dir() / (name if at is None or at == steps else f"{name}-at{at}")


def train_model(
    seed: int,
    tokenizer,
    docs: list[str],
    steps: int,
    batch: int = 16,
    layers: int = 6,
    d: int = 128,
    checkpoints: tuple[int, ...] = (),
) -> Path:
    """Train (or reuse) one seed; also saves the model after each step count in `checkpoints`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = model_dir(seed, steps, layers, d)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=d,
        n_layer=layers,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    # the token stream: documents joined with BOS, cut into CONTEXT windows (same for every seed)
    ids: list[int] = []
    for doc in docs:
        ids += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) > steps * batch * CONTEXT:
            break
    data = torch.tensor(ids[: (len(ids) // CONTEXT) * CONTEXT]).view(-1, CONTEXT)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1234))  # same data order for all seeds
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        rows = order[(step * batch) % len(data) :][:batch]
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step + 1 in checkpoints and step + 1 < steps:
            model.save_pretrained(model_dir(seed, steps, layers, d, at=step + 1))
            tokenizer.save_pretrained(model_dir(seed, steps, layers, d, at=step + 1))
        if step % 200 == 0 or step == steps - 1:
            print(f"  seed {seed} step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
