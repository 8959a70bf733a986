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
        enc = sae.encode(x, training=False)
        ours = torch.zeros(64, 96).scatter_(1, enc.top_indices, enc.top_acts)
        assert torch.allclose(feats, ours, atol=1e-5)
        assert torch.allclose(theirs.decode(feats), sae.reconstruct(x), atol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.8.hook_resid_post"


def trained_batchtopk(arch: str, widths=(), d=24, f=96, k=6, steps=30) -> TopKSAE:
    """A few BatchTopK training steps on correlated data: a learned threshold, not a hand-set one."""
    from itda.sae import SaeTrainer, TrainConfig
    from itda.synthetic import synthetic_activations

    start, sae = trained_like_sae(d, f, k, seed=3), TopKSAE(SaeConfig(d, f, k, arch, widths))
    sae.load_state_dict(start.state_dict())
    x = synthetic_activations(steps * 128, d, n_features=2 * f, seed=4).acts
    SaeTrainer(sae, TrainConfig(steps=steps, lr=1e-3, threshold_lr=0.1)).fit(x.split(128), progress=False)
    return sae


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_saelens_loads_jumprelu_export_and_matches_forward(arch, tmp_path):
    """SAELens's own loader reads a BatchTopK export as JumpReLU; codes and forward equal itda's to 1e-5."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[interop]')")
    sae = trained_batchtopk(arch, (24, 48, 96) if arch == "matryoshka_batchtopk" else ())
    assert float(sae.threshold) > 0
    export_saelens(sae, SaeMeta(model="smollm2-135m", hookpoint="resid_post.8"), tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert type(theirs).__name__ == "JumpReLUSAE"
    assert torch.equal(theirs.threshold, torch.full((96,), sae.inference_threshold()))
    assert theirs.cfg.metadata.training_architecture == arch
    from itda.synthetic import synthetic_activations

    x = synthetic_activations(1024, 24, n_features=192, seed=9).acts  # rows like the training data
    with torch.no_grad():
        feats = theirs.encode(x)
        enc = sae.encode(x, training=False)
        ours = torch.zeros(1024, 96).scatter_(1, enc.top_indices, enc.top_acts)
        assert torch.equal(feats > 0, ours > 0)  # the same latents kept, token by token
        assert float((feats - ours).abs().max()) < 1e-5
        assert float((theirs(x) - sae.reconstruct(x)).abs().max()) < 1e-5  # measured: 3.8e-6 (|x_hat| <= 17)
    l0 = (ours > 0).sum(1)
    assert int(l0.min()) < int(l0.max())


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


def test_itda_loads_saelens_own_matryoshka_inference_save(tmp_path):
    """A MatryoshkaBatchTopK SAE saved by SAELens itself reads back as itda's matryoshka_batchtopk."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[interop]')")
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=24, d_sae=96, k=6, matryoshka_widths=[24, 48, 96], rescale_acts_by_decoder_norm=False
    )
    theirs = MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        theirs.b_enc.normal_(0, 0.3)
        theirs.b_dec.normal_(0, 0.3)
    theirs.topk_threshold = torch.tensor(0.2, dtype=torch.double)
    theirs.save_inference_model(tmp_path / "own")
    loaded = load_sae(tmp_path / "own").sae
    assert loaded.cfg == SaeConfig(24, 96, 6, "matryoshka_batchtopk", (24, 48, 96))
    assert loaded.inference_threshold() == pytest.approx(0.2)
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "own"))  # their JumpReLU inference form
    x = torch.randn(128, 24)
    with torch.no_grad():
        enc = loaded.encode(x, training=False)
        ours = torch.zeros(128, 96).scatter_(1, enc.top_indices, enc.top_acts)
        assert torch.allclose(ours, inference.encode(x), atol=1e-5)
        assert torch.allclose(loaded.reconstruct(x), inference(x), atol=1e-5)
