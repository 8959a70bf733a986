"""Exports loaded by the real SAELens and sparsify packages (optional: `pip install -e '.[interop]'`)."""

import pytest
import torch

from itda.sae import SaeConfig, SaeMeta, TopKSAE, export_saelens, export_sparsify, load_sae

pytestmark = pytest.mark.interop


def trained_like_sae(d=24, f=96, k=6, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d, f, k))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.5)
    sae.normalise_decoder()
    return sae


def test_saelens_loads_export_and_matches_forward(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[interop]')")
    sae = trained_like_sae()
    export_saelens(sae, SaeMeta(model="smollm2-135m", hookpoint="resid_post.8"), tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert type(theirs).__name__ == "TopKSAE"
    x = torch.randn(64, 24) * 3
    with torch.no_grad():
        feats = theirs.encode(x)
        enc = sae.encode(x, batch=False)
        ours = torch.zeros(64, 96).scatter_(1, enc.top_indices, enc.top_acts)
        assert torch.allclose(feats, ours, atol=1e-5)
        assert torch.allclose(theirs.decode(feats), sae.reconstruct(x), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.8.hook_resid_post"


def test_sparsify_loads_export_and_matches_forward(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (pip install -e '.[interop]')")
    sae = trained_like_sae(seed=1)
    folder = export_sparsify(sae, SaeMeta(hookpoint="resid_post.8"), tmp_path / "sp")
    theirs = sparsify.SparseCoder.load_from_disk(folder)
    x = torch.randn(64, 24) * 3
    with torch.no_grad():
        enc = theirs.encode(x)
        assert torch.allclose(theirs.decode(enc.top_acts, enc.top_indices), sae.reconstruct(x), atol=1e-5)
        out = theirs(x)
        assert abs(float(out.fvu) - float(sae(x).fvu)) < 1e-5


def test_sparsify_finetunes_from_an_itda_export(tmp_path, monkeypatch):
    """sparsify's own Trainer continues training from the export, as its --finetune does."""
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify not installed (pip install -e '.[interop]')")
    datasets = pytest.importorskip("datasets")
    from safetensors.torch import load_model
    from tiny_models import tiny_model

    model = tiny_model("llama", vocab=128)
    d = model.config.hidden_size
    sae = trained_like_sae(d=d, f=4 * d, k=4, seed=2)
    export_sparsify(sae, SaeMeta(hookpoint="resid_post.1"), tmp_path / "export")
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(4, 128, (16, 32), generator=g).tolist()}).with_format(
        "torch"
    )
    cfg = sparsify.TrainConfig(
        sparsify.SaeConfig(num_latents=4 * d, k=4),
        batch_size=4,
        layers=[1],
        log_to_wandb=False,
        finetune=str(tmp_path / "export"),
        save_dir=str(tmp_path / "ck"),
        optimizer="adam",
        lr=1e-3,
        lr_warmup_steps=1,
        save_every=10_000,
    )
    monkeypatch.chdir(tmp_path)
    trainer = sparsify.Trainer(cfg, data, model)
    ((name, theirs),) = trainer.saes.items()
    assert name == "layers.1"
    load_model(theirs, str(tmp_path / "export" / name / "sae.safetensors"))
    assert torch.equal(theirs.W_dec.detach(), sae.W_dec.detach())
    trainer.fit()
    assert not torch.equal(theirs.W_dec.detach(), sae.W_dec.detach())  # it trained from our weights
    saved = load_sae(tmp_path / "ck" / "unnamed" / name)  # and itda reads its checkpoint back
    assert torch.allclose(saved.sae.W_dec, theirs.W_dec.detach().float(), atol=1e-6)
