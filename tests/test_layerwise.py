import contextlib

import pytest
import torch
from tiny_models import tiny_model

from itda.activations.hookpoints import Hookpoint, StopForward, capture
from itda.activations.layerwise import LayerwiseModel, WeightIndex

ARCHS = ["llama", "qwen2", "gemma3", "gpt2"]


def _ids(batch=5, seq=20, seed=0):
    return torch.randint(4, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=ARCHS)
def sharded(request, tmp_path):
    model = tiny_model(request.param)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    return request.param, model, tmp_path


def _capture(model, hps, ids, mask):
    with torch.inference_mode(), capture(model, hps) as store, contextlib.suppress(StopForward):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return dict(store)


@pytest.mark.parametrize("micro_batch", [1, 2, 8])
def test_layerwise_equals_in_memory(sharded, micro_batch):
    arch, model, folder = sharded
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # padding in one row
    hps = [Hookpoint("resid_post", 0), Hookpoint("resid_pre", 2), Hookpoint("resid_post", 2)]
    if arch != "gemma3":
        hps.append(Hookpoint("mlp_out", 1))
    want = _capture(model, hps, ids, mask)
    lw = LayerwiseModel(folder, max_layer=2, micro_batch=micro_batch)
    got = _capture(lw.model, hps, ids, mask)
    lw.close()
    for hp in hps:
        torch.testing.assert_close(got[hp], want[hp], rtol=1e-5, atol=1e-5, msg=f"{arch} {hp.name}")
    # blocks past the deepest one are never read; the final norm and LM head stay on meta
    assert all(p.device.type == "meta" for p in lw.blocks[3].parameters())


def test_reads_only_needed_tensors(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    lw = LayerwiseModel(tmp_path, max_layer=1, prefetch=False)
    _capture(lw.model, [Hookpoint("resid_post", 1)], _ids(), None)
    per_block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert lw.bytes_read == 2 * per_block  # blocks 0 and 1, once each
    assert lw.block_bytes(0) == per_block


def test_missing_index(tmp_path):
    from itda.errors import ItdaInputError

    with pytest.raises(ItdaInputError, match="no model.safetensors"):
        WeightIndex.open(tmp_path)


MEMORY_CHILD = r"""
import contextlib, sys, threading, time, torch
from itda.activations.hookpoints import Hookpoint, StopForward, capture
from itda.activations.layerwise import LayerwiseModel

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], rss("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()

folder, mode = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(0))
if mode == "layerwise":
    lw = LayerwiseModel(folder, max_layer=11, micro_batch=2)
    model = lw.model
else:
    from transformers import AutoModelForCausalLM
    model = None
# warm the code pages a forward touches (kernels, lazy imports), so the peak below measures data
from transformers import LlamaConfig, LlamaForCausalLM
warm = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                    num_attention_heads=8, num_key_value_heads=8)).eval()
with torch.inference_mode():
    warm(input_ids=ids, use_cache=False)
del warm
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base, base_anon = rss("VmRSS"), rss("RssAnon")
time.sleep(0.05)
peak_anon[0] = base_anon
if model is None:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.inference_mode(), capture(model, [Hookpoint("resid_post", 11)]) as store, contextlib.suppress(StopForward):
    model(input_ids=ids, use_cache=False)
time.sleep(0.05)
print(rss("VmHWM") - base, max(peak_anon[0], rss("RssAnon")) - base_anon)
"""


@pytest.mark.slow
def test_peak_memory_stays_near_two_blocks(tmp_path):
    """A 12-block checkpoint (~200 MB): layer-wise peak ~2 blocks + activations, in-memory all of it."""
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, max_shard_size="30MB")
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    del model
    script = tmp_path / "child.py"
    script.write_text(MEMORY_CHILD)
    runs = {
        m: subprocess.run(
            [sys.executable, str(script), str(tmp_path), m], capture_output=True, text=True, check=True
        ).stdout.split()[-2:]
        for m in ("layerwise", "in_memory")
    }
    peak = {m: int(v[0]) for m, v in runs.items()}  # VmHWM growth
    anon = {m: int(v[1]) for m, v in runs.items()}  # peak RssAnon growth
    assert total > 10 * block
    # two reusable block buffers + activations, however deep: anonymous and total resident memory
    assert anon["layerwise"] < 2 * block + 32 * 2**20, (anon, block)
    # resident pages also count mapped shard pages while a tensor is copied (reclaimable, then dropped):
    # well under the model, which the in-memory load holds whole
    assert peak["layerwise"] < 0.6 * total, (peak, total)
    assert peak["in_memory"] > 0.9 * total, (peak, total)


def test_cli_layerwise_build_matches_in_memory(tmp_path):
    import json

    from tiny_models import sample_docs, word_tokenizer
    from typer.testing import CliRunner

    from itda.activations.models import load_model
    from itda.cli.main import app
    from itda.dictionary import Dictionary

    tok = word_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_size="40KB")
    tok.save_pretrained(folder)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_docs(20)))
    runner = CliRunner()
    outs = {}
    for flag in ("--layerwise", "--in-memory"):
        out = tmp_path / flag.strip("-")
        r = runner.invoke(
            app,
            [
                "build",
                str(folder),
                "--layer",
                "2",
                "--corpus",
                str(corpus),
                "--tokens",
                "1500",
                "--context",
                "32",
                "--k",
                "8",
                "--out",
                str(out),
                flag,
            ],
        )
        assert r.exit_code == 0, r.output
        outs[flag] = Dictionary.load(out / "resid_post.2.safetensors")
    a, b = outs["--layerwise"], outs["--in-memory"]
    assert torch.equal(a.refs, b.refs)
    torch.testing.assert_close(a.atoms, b.atoms, rtol=1e-4, atol=1e-4)
    # automatic choice: a budget smaller than the model picks layer-wise execution
    assert load_model(str(folder), layerwise=None, max_memory=1000, max_layer=1).layerwise is not None
    assert load_model(str(folder), layerwise=None, max_memory=1 << 34).layerwise is None


def test_gpt2_lm_head_folder_is_a_causal_lm(tmp_path):
    """GPT2LMHeadModel is a causal LM (its class name has no 'ForCausalLM'): both loaders keep the head."""
    from tiny_models import word_tokenizer

    from itda.activations.models import load_model

    tok = word_tokenizer()
    tiny_model("gpt2", vocab=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for layerwise in (False, True):
        lm = load_model(str(tmp_path), layerwise=layerwise)
        assert lm.is_causal and type(lm.model).__name__ == "GPT2LMHeadModel"
