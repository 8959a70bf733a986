"""Direct logit effects of directions (itda.explorer.logits) against the norm and unembedding written
out in float64 here, for an RMSNorm (llama), a (1 + w) RMSNorm (gemma3) and a LayerNorm with biases
(gpt2); none for an encoder (BERT). And each card's coefficient histogram."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from itda.explorer.data import coefficient_histogram
from itda.explorer.logits import direct_logit_effects


@torch.no_grad()
def _reference(model, arch: str, u_MD: torch.Tensor) -> torch.Tensor:
    u = u_MD.double()
    if arch == "gpt2":
        ln = model.transformer.ln_f
        centred = u - u.mean(1, keepdim=True)
        normed = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + ln.eps) * ln.weight.double()
        # the LayerNorm's beta cancels against the zero direction's logits
    else:
        norm = model.model.norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        w = norm.weight.double() + (1.0 if arch == "gemma3" else 0.0)
        normed = u / torch.sqrt(u.pow(2).mean(1, keepdim=True) + eps) * w
    return normed @ model.get_output_embeddings().weight.double().T


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_logit_effects_are_the_direction_through_final_norm_and_head(arch):
    model = tiny_model(arch, vocab=300, seed=2)
    norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
    with torch.no_grad():  # away from their initial ones and zeros, so that each term counts
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    u = torch.nn.functional.normalize(torch.randn(600, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    got = direct_logit_effects(model, u, top=6)
    assert got is not None
    want = _reference(model, arch, u)
    top, bottom = want.topk(6, dim=1), want.topk(6, dim=1, largest=False)
    assert torch.equal(got.promoted_MK, top.indices) and torch.equal(got.suppressed_MK, bottom.indices)
    np.testing.assert_allclose(got.promoted_value_MK.numpy(), top.values.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.suppressed_value_MK.numpy(), bottom.values.numpy(), atol=1e-4)


def test_an_encoder_has_no_logit_effects():
    assert direct_logit_effects(tiny_model("bert", vocab=300), torch.randn(3, 32)) is None


def test_coefficient_histogram_counts_every_use():
    values = np.array([0.5, 1.0, 1.5, -0.25, 2.0])
    h = coefficient_histogram(values, bins=4)
    assert h["lo"] == -0.25 and h["hi"] == 2.0 and sum(h["counts"]) == 5
    assert h["counts"] == np.histogram(values, bins=4, range=(-0.25, 2.0))[0].tolist()
    assert coefficient_histogram(np.array([]))["counts"] == []
