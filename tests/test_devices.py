"""--device auto and --model-dtype auto: CUDA and bfloat16 when CUDA is there (faked here), else CPU and float32."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_bad, run_ok
from tiny_models import saved_model_and_corpus

from itda.activations.config import ModelSource
from itda.configfields import FieldError
from itda.devices import choose_device, choose_model_dtype


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_auto_is_cuda_and_bfloat16_where_cuda_is(fake_cuda, monkeypatch):
    assert choose_device("auto") == torch.device("cuda") and choose_device(None) == torch.device("cuda")
    assert choose_device("cuda:1") == torch.device("cuda:1")
    assert choose_model_dtype("auto", "cuda") is torch.bfloat16
    assert choose_model_dtype("auto", "cpu") is torch.float32
    assert choose_model_dtype("float16", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_model_dtype("auto", "cuda") is torch.float16
    src = ModelSource("m")
    assert src.device == "auto" and src.model_dtype == "auto"
    assert src.torch_device() == torch.device("cuda") and src.torch_dtype() is torch.float16
    with pytest.raises(FieldError, match="only 2 CUDA"):
        choose_device("cuda:2")


def test_auto_is_cpu_and_float32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert ModelSource("m").torch_dtype() is torch.float32
    with pytest.raises(FieldError, match="CUDA is not available") as err:
        choose_device("cuda")
    assert err.value.field == "device"
    with pytest.raises(FieldError, match="not a torch device"):
        choose_device("gpu0")
    with pytest.raises(FieldError, match="model_dtype"):
        ModelSource("m", model_dtype="int4").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_refuses_cuda_without_cuda_and_says_what_it_chose(tmp_path):
    model, corpus, _docs = saved_model_and_corpus(tmp_path, 8, seed=0)
    out = tmp_path / "d.safetensors"
    args = ["build", str(model), "--layer", "1", "--corpus", str(corpus), "--tokens", "200", "--out", str(out)]
    run_bad([*args, "--device", "cuda"], "--device cuda: CUDA is not available")
    assert not out.exists()
    result = run_ok([*args, "-q"])
    assert f"model {model} on cpu, float32" in result.output
    result = run_ok([*args, "-q", "--model-dtype", "bfloat16", "--overwrite"])
    assert "on cpu, bfloat16" in result.output
