"""Tiny randomly initialised transformers models and a word-level fast tokenizer, built offline."""

from __future__ import annotations

import re

import torch

WORDS = (
    "the a of to and in is that it for on with as was by be this are from or an at which not have but "
    "data model layer token atom value function return list string number error file path class method "
    "object type name default shape tensor input output first second when each one two three"
).split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, ".": 4}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def sample_docs(n: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        length = int(torch.randint(20, 300, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        text = " ".join(WORDS[i] for i in idx)
        docs.append(re.sub(r"(\w+) (\w+) (\w+) ", r"\1 \2. \3 ", text, count=3))
    return docs


def tiny_model(arch: str, vocab: int = 128, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=256)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=256)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **common,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(**common, max_position_embeddings=256)
        model = tf.BertModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def reversed_word_tokenizer():
    """Same word boundaries as word_tokenizer, different ids: a 'different tokenizer'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = word_tokenizer().get_vocab()
    words = sorted(base, key=lambda w: -base[w])
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def loaded(name: str, arch: str, tokenizer, seed: int = 0):
    from pathlib import Path

    from itda.activations.models import LoadedModel

    return LoadedModel(name, tiny_model(arch, vocab=len(tokenizer), seed=seed), tokenizer, Path("."))


def saved_model_and_corpus(root, n_docs: int, seed: int, arch: str = "llama"):
    """A tiny model folder (weights + tokenizer) and a JSONL corpus of sample_docs under root:
    (model folder, corpus path, the documents)."""
    import json

    tok = word_tokenizer()
    model = root / "tiny"
    tiny_model(arch, vocab=len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    docs = sample_docs(n_docs, seed=seed)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return model, corpus, docs
