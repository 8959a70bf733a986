"""SAE architectures (topk, batchtopk, matryoshka_batchtopk) against references written here: the
threshold EMA and the Matryoshka loss by formula, the JumpReLU inference rule, the itda file and
checkpoint round trips, and each architecture trained, evaluated, exported and resumed through the CLI."""

import hashlib
import json

import pytest
import torch
from cli_helpers import run_bad, run_ok, runner, synthetic_acts_file

import itda.sae.train
from itda.cli.main import app
from itda.configfields import FieldError
from itda.errors import ItdaInputError
from itda.sae import ARCH_NAMES, SaeConfig, SaeMeta, SaeTrainer, TopKSAE, TrainConfig, load_sae, save_sae
from itda.sae.io import export_saelens, export_sparsify
from itda.sae.train import SaeSpec
from itda.tensorfile import read_tensor_file, write_tensor_file

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def random_sae(arch="batchtopk", d=16, f=48, k=4, widths=(), seed=0, threshold=0.0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d, f, k, arch, widths))
    with torch.no_grad():
        for n in PARAMS:
            getattr(sae, n).copy_(torch.randn(getattr(sae, n).shape, generator=g) * (0.3 if n == "b_enc" else 1.0))
        sae.threshold.fill_(threshold)
    sae.normalise_decoder()
    return sae


def plain_pre(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """relu(W_enc (x - b_dec) + b_enc) in float64."""
    we, be, _, bd = (getattr(sae, n).detach().double() for n in PARAMS)
    return torch.clamp((x.double() - bd) @ we.T + be, min=0)


def plain_batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes keeping the B*k largest entries of the batch (a sort, not topk)."""
    kth = pre.reshape(-1).sort(descending=True).values[pre.shape[0] * k - 1]
    return torch.where(pre >= kth, pre, torch.zeros_like(pre))


def dense(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The inference codes [B, F]."""
    with torch.no_grad():
        enc = sae.encode(x, training=False)
        return torch.zeros(x.shape[0], sae.cfg.n_latents).scatter_add_(1, enc.top_indices, enc.top_acts)


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- by formula ------------------------------------------------------------------------------------
def test_threshold_is_the_ema_of_each_batch_smallest_kept_activation():
    sae = random_sae(seed=1)
    rate = 0.25
    trainer = SaeTrainer(sae, TrainConfig(steps=4, lr=1e-2, threshold_lr=rate))
    g = torch.Generator().manual_seed(2)
    expected = 0.0
    for _ in range(4):
        x = torch.randn(32, 16, generator=g)
        codes = plain_batch_topk(plain_pre(sae, x), 4)  # the weights this step sees
        low = float(codes[codes > 0].min())
        expected = (1 - rate) * expected + rate * low
        stats = trainer.step(x)
        assert stats.l0 == 4.0  # B*k kept over the batch
        assert abs(float(sae.threshold) - expected) <= 1e-6 * expected
    assert sae.threshold.dtype == torch.float64
    assert TrainConfig().threshold_lr == 0.01  # SAELens's topk_threshold_lr


def test_matryoshka_loss_is_the_sum_of_the_prefix_fvus():
    widths = (6, 20, 48)
    sae = random_sae("matryoshka_batchtopk", widths=widths, seed=3)
    x = torch.randn(40, 16) * 2
    sae.train()
    out = sae(x)
    codes = plain_batch_topk(plain_pre(sae, x), 4)
    wd, bd = sae.W_dec.detach().double(), sae.b_dec.detach().double()
    xd = x.double()
    total = ((xd - xd.mean(0)) ** 2).sum()
    fvus = []
    for w in widths:  # each prefix alone: b_dec and the kept latents below its width
        recon = codes[:, :w] @ wd[:w] + bd
        fvus.append(float(((xd - recon) ** 2).sum() / total))
    assert abs(float(out.recon_loss.detach()) - sum(fvus)) < 1e-5 * sum(fvus)
    assert abs(float(out.fvu.detach()) - fvus[-1]) < 1e-5 * fvus[-1]
    out.recon_loss.backward()  # every prefix's loss reaches the encoder
    assert sae.W_enc.grad is not None and bool(sae.W_enc.grad.abs().sum() > 0)
    plain = random_sae("batchtopk", seed=3)
    assert torch.equal(plain(x).recon_loss, plain(x).fvu)  # BatchTopK: the FVU itself


def test_jumprelu_inference_keeps_what_exceeds_the_threshold_at_any_batch_size():
    sae = random_sae(seed=4, threshold=0.9)
    x = torch.randn(50, 16) * 1.5
    pre = plain_pre(sae, x)
    thr = float(torch.tensor(0.9, dtype=torch.float32))  # inference (and SAELens) use the float32 value
    codes = torch.where(pre > thr, pre, torch.zeros_like(pre))
    ref = codes @ sae.W_dec.detach().double() + sae.b_dec.detach().double()
    assert torch.allclose(sae.reconstruct(x).double(), ref, atol=1e-5)
    one_by_one = torch.cat([dense(sae, x[i : i + 1]) for i in range(50)])
    assert torch.equal(one_by_one > 0, dense(sae, x) > 0)  # each token's codes: the same at any batch size
    assert torch.allclose(one_by_one, dense(sae, x), atol=1e-5)
    l0 = (codes > 0).sum(1)
    assert int(l0.min()) != int(l0.max())  # a token's L0 varies
    before = sae.reconstruct(x)
    sae.scale_biases_(4.0)  # the same SAE for 4x the activations: the threshold scales with them
    assert float(sae.threshold) == 3.6
    assert torch.allclose(sae.reconstruct(4 * x), 4 * before, atol=1e-4)


def test_topk_is_unchanged_by_the_architectures():
    sae = random_sae("topk", seed=5)
    x = torch.randn(30, 16)
    assert sae.cfg.to_dict() == {"d_in": 16, "n_latents": 48, "k": 4, "arch": "topk"}
    sae.train()
    a = sae.encode(x)
    sae.eval()
    b = sae.encode(x)
    assert torch.equal(a.top_indices, b.top_indices) and torch.equal(a.top_acts, b.top_acts)
    assert a.top_acts.shape == (30, 4)


# -- configs ---------------------------------------------------------------------------------------
def test_spec_resolves_arch_widths_and_the_deprecated_flag():
    assert set(ARCH_NAMES) == {"topk", "batchtopk", "matryoshka_batchtopk"}
    assert SaeSpec(latents=64, batch_topk=True).sae_config(8).arch == "batchtopk"
    cfg = SaeSpec(latents=64, k=4, arch="matryoshka_batchtopk", matryoshka_widths="8, 16").sae_config(8)
    assert cfg.matryoshka_widths == (8, 16, 64)  # the latents appended
    assert SaeSpec(latents=64, arch="matryoshka_batchtopk", matryoshka_widths=[8, 64]).widths() == (8, 64)
    bad = [
        (dict(arch="gated"), "arch"),
        (dict(arch="batchtopk", matryoshka_widths="8"), "matryoshka_widths"),
        (dict(arch="matryoshka_batchtopk"), "matryoshka_widths"),
        (dict(arch="matryoshka_batchtopk", matryoshka_widths="16,8"), "matryoshka_widths"),
        (dict(arch="matryoshka_batchtopk", matryoshka_widths="8,128"), "matryoshka_widths"),
        (dict(arch="matryoshka_batchtopk", matryoshka_widths="8;16"), "matryoshka_widths"),
        (dict(arch="matryoshka_batchtopk", batch_topk=True, matryoshka_widths="8"), "batch_topk"),
    ]
    for kw, field in bad:
        with pytest.raises(FieldError) as err:
            SaeSpec(latents=64, k=4, **kw).validate()
        assert err.value.field == field, kw
    with pytest.raises(FieldError, match="threshold_lr"):
        TrainConfig(threshold_lr=0).validate()


# -- files -----------------------------------------------------------------------------------------
def test_itda_file_keeps_arch_widths_and_the_float64_threshold(tmp_path):
    sae = random_sae("matryoshka_batchtopk", widths=(12, 48), seed=6, threshold=0.1234567890123)
    p = tmp_path / "m.safetensors"
    save_sae(sae, p, SaeMeta(hookpoint="resid_post.1"))
    back = load_sae(p).sae
    assert back.cfg == sae.cfg and float(back.threshold) == 0.1234567890123
    x = torch.randn(20, 16)
    assert torch.equal(back.reconstruct(x), sae.reconstruct(x))
    header, tensors = read_tensor_file(p)
    assert tensors["threshold"].dtype == torch.float64
    entry = json.loads(header["itda_sae"])
    cases = [
        (lambda h, t: h["cfg"].update(arch="gated"), "cfg.arch"),
        (lambda h, t: h["cfg"].update(matryoshka_widths=[48, 12]), "cfg.matryoshka_widths"),
        (lambda h, t: h["cfg"].update(matryoshka_widths="12,48"), "cfg.matryoshka_widths"),
        (lambda h, t: h["cfg"].update(arch="batchtopk"), "cfg.matryoshka_widths"),
        (lambda h, t: t.pop("threshold"), "threshold"),
        (lambda h, t: t.update(threshold=torch.tensor([-1.0], dtype=torch.float64)), "threshold"),
        (lambda h, t: t.update(threshold=torch.tensor([float("nan")], dtype=torch.float64)), "threshold"),
    ]
    for i, (change, fragment) in enumerate(cases):
        h, t = json.loads(json.dumps(entry)), dict(tensors)
        change(h, t)
        bad = tmp_path / f"bad{i}.safetensors"
        write_tensor_file(bad, t, "itda_sae", h)
        with pytest.raises(ItdaInputError, match=fragment):
            load_sae(bad)


def test_files_of_the_batch_topk_option_load_as_topk(tmp_path):
    """Before architectures, batch_topk was a training option: those SAEs infer by per-token TopK."""
    sae = random_sae("topk", seed=7)
    p = tmp_path / "old.safetensors"
    save_sae(sae, p)
    header, tensors = read_tensor_file(p)
    entry = json.loads(header["itda_sae"])
    entry["cfg"] = {"d_in": 16, "n_latents": 48, "k": 4, "batch_topk": True}
    write_tensor_file(p, tensors, "itda_sae", entry)
    back = load_sae(p).sae
    assert back.cfg.arch == "topk"
    x = torch.randn(9, 16)
    assert torch.equal(back.reconstruct(x), sae.reconstruct(x))


def test_saelens_jumprelu_export_reads_back_and_sparsify_refuses(tmp_path):
    for arch, widths in (("batchtopk", ()), ("matryoshka_batchtopk", (16, 48))):
        sae = random_sae(arch, widths=widths, seed=8, threshold=0.7)
        folder = export_saelens(sae, SaeMeta(hookpoint="resid_post.3"), tmp_path / arch)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "jumprelu" and "k" not in cfg
        assert cfg["metadata"]["training_architecture"] == arch
        _, tensors = read_tensor_file(folder / "sae_weights.safetensors")
        assert torch.equal(tensors["threshold"], torch.full((48,), 0.7, dtype=torch.float32))
        back = load_sae(folder)
        assert back.sae.cfg == sae.cfg and back.meta.hookpoint == "blocks.3.hook_resid_post"
        x = torch.randn(30, 16)
        assert torch.equal(back.sae.reconstruct(x), sae.reconstruct(x))
        with pytest.raises(ItdaInputError, match="--format saelens"):
            export_sparsify(sae, SaeMeta(), tmp_path / f"sp-{arch}")
    tensors["threshold"][3] = 0.5  # per-latent thresholds: not a BatchTopK export
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ItdaInputError, match="global threshold"):
        load_sae(folder)


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_resumes_the_threshold_exactly(tmp_path):
    x = torch.randn(640, 16)
    ck = tmp_path / "ck.safetensors"
    whole = SaeTrainer(random_sae(seed=9), TrainConfig(steps=6, lr=1e-3))
    whole.fit(x.split(64), progress=False)
    first = SaeTrainer(random_sae(seed=9), TrainConfig(steps=6, lr=1e-3))

    def stop_at_4(trainer, stats):
        if stats.step == 4:
            raise KeyboardInterrupt  # fit checkpoints on Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        first.fit(x.split(64), checkpoint=ck, progress=False, callback=stop_at_4)
    resumed, _ = SaeTrainer.load_checkpoint(ck)
    resumed.fit(x.split(64), progress=False)
    assert float(resumed.sae.threshold) == float(whole.sae.threshold) > 0
    for n in PARAMS:
        assert torch.equal(getattr(resumed.sae, n), getattr(whole.sae, n))
    header, tensors = read_tensor_file(ck)
    tensors.pop("sae.threshold")
    write_tensor_file(
        tmp_path / "bad.safetensors", tensors, "itda_sae_checkpoint", json.loads(header["itda_sae_checkpoint"])
    )
    with pytest.raises(ItdaInputError, match="threshold"):
        SaeTrainer.load_checkpoint(tmp_path / "bad.safetensors")


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    return synthetic_acts_file(tmp_path_factory.mktemp("arch") / "acts.safetensors", 3000, 16, n_features=64, seed=5)


ARCH_ARGS = {
    "topk": [],
    "batchtopk": ["--arch", "batchtopk"],
    "matryoshka_batchtopk": ["--arch", "matryoshka_batchtopk", "--matryoshka-widths", "16,32,64"],
}


def train_args(acts, out, arch, *extra):
    base = ["sae", "train", str(acts), "--out", str(out), "--latents", "64", "--k", "4", "--init", "data"]
    return base + ["--steps", "20", "--batch-size", "128", "--threshold-lr", "0.2", "-q", *ARCH_ARGS[arch], *extra]


@pytest.mark.parametrize("arch", sorted(ARCH_ARGS))
def test_each_arch_trains_evaluates_and_exports_through_the_cli(arch, acts, tmp_path):
    out = tmp_path / "sae.safetensors"
    r = run_ok(train_args(acts, out, arch))
    loaded = load_sae(out)
    assert loaded.sae.cfg.arch == arch and loaded.meta.train["arch"] == arch
    assert 0 < loaded.meta.train["heldout"]["fvu"] < 1
    if arch != "topk":
        assert "threshold" in r.output and loaded.meta.train["threshold"] == float(loaded.sae.threshold) > 0
        assert loaded.meta.train["heldout"]["l0"] != 4.0  # JumpReLU: L0 varies by token
    rep = tmp_path / "rep.json"
    run_ok(["sae", "eval", str(out), str(acts), "--out", str(rep)])
    assert json.loads(rep.read_text())["fvu"] == pytest.approx(loaded.meta.train["heldout"]["fvu"], rel=0.5)
    r = run_ok(["export", str(out), "--format", "saelens", "--out", str(tmp_path / "sl")])
    assert ("JumpReLU" in r.output) == (arch != "topk")
    x = torch.randn(20, 16)
    assert torch.allclose(load_sae(tmp_path / "sl").sae.reconstruct(x), loaded.sae.reconstruct(x), atol=1e-6)
    if arch != "topk":
        run_bad(["export", str(out), "--format", "sparsify", "--out", str(tmp_path / "sp")], "saelens")
        assert not (tmp_path / "sp").exists()


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_an_interrupted_run_resumes_byte_identically(arch, acts, tmp_path, monkeypatch):
    whole, out, ck = tmp_path / "whole.safetensors", tmp_path / "o.safetensors", tmp_path / "ck.safetensors"
    run_ok(train_args(acts, whole, arch))
    real = SaeTrainer.step

    def interrupted(self, x):
        if self.step_count == 13:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(itda.sae.train.SaeTrainer, "step", interrupted)
    args = train_args(acts, out, arch, "--checkpoint", str(ck), "--checkpoint-every", "5")
    assert runner.invoke(app, args).exit_code == 130  # Ctrl-C after 13 steps: checkpointed there
    assert ck.exists() and not out.exists()
    monkeypatch.setattr(itda.sae.train.SaeTrainer, "step", real)
    run_ok(args)
    assert digest(out) == digest(whole) and not ck.exists()


def test_bad_arch_options_exit_2(acts, tmp_path):
    out = tmp_path / "o.safetensors"
    run_bad(train_args(acts, out, "topk", "--arch", "gated"), "--arch")
    run_bad(train_args(acts, out, "batchtopk", "--matryoshka-widths", "8"), "--matryoshka-widths")
    run_bad(train_args(acts, out, "topk", "--arch", "matryoshka_batchtopk"), "--matryoshka-widths")
    run_bad(train_args(acts, out, "batchtopk", "--threshold-lr", "2"), "--threshold-lr")
    assert not out.exists()


def test_api_trains_each_arch():
    from itda import train_sae
    from itda.synthetic import synthetic_activations

    x = synthetic_activations(1200, 16, n_features=48, seed=2).acts
    for arch, widths in (("batchtopk", None), ("matryoshka_batchtopk", [8, 32])):
        loaded = train_sae(
            x, latents=32, k=4, arch=arch, matryoshka_widths=widths, steps=5, batch_size=64, progress=False
        )
        assert loaded.sae.cfg.arch == arch and float(loaded.sae.threshold) > 0


def test_transfer_init_carries_the_learned_threshold(tmp_path):
    from itda.sae import new_sae

    src = random_sae(seed=10, threshold=0.625)
    p = tmp_path / "src.safetensors"
    save_sae(src, p)
    sae, info = new_sae(SaeConfig(16, 48, 4, "batchtopk"), f"transfer:{p}", torch.randn(64, 16))
    assert float(sae.threshold) == 0.625 and info["b_dec"] == "transferred"
    topk, _ = new_sae(SaeConfig(16, 48, 4), f"transfer:{p}", torch.randn(64, 16))
    assert float(topk.threshold) == 0.0


def _reference_loss(params: dict, x: torch.Tensor, k: int, arch: str, dead: torch.Tensor, k_aux: int):
    """FVU + AuxK of the dense textbook forward in float64: every pre-activation differentiable."""
    we, be, wd, bd = (params[n] for n in PARAMS)
    pre = torch.relu((x - bd) @ we.T + be)
    if arch == "topk":
        kth = pre.topk(k, dim=1).values[:, -1:]
    else:
        kth = pre.reshape(-1).sort(descending=True).values[pre.shape[0] * k - 1]
    codes = torch.where(pre >= kth, pre, torch.zeros_like(pre))
    err = x - (codes @ wd + bd)
    total = (x - x.mean(0)).pow(2).sum()
    masked = torch.where(dead[None], pre, torch.full_like(pre, -torch.inf))
    aux_kth = masked.topk(k_aux, dim=1).values[:, -1:]
    aux_codes = torch.where(dead[None] & (masked >= aux_kth), pre, torch.zeros_like(pre))
    aux = min(int(dead.sum()) / k_aux, 1.0) * (aux_codes @ wd - err.detach()).pow(2).sum() / total
    return err.pow(2).sum() / total + aux / 32


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_gradients_through_the_kept_entries_equal_the_dense_textbook_forward(arch):
    """The sparse encoder backward (kept_pre) gives the gradients of the dense float64 forward, AuxK included."""
    sae = random_sae(arch, d=16, f=48, k=4, seed=3)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::4] = True
    out = sae(x, dead, 6)
    (out.fvu + out.auxk_loss / 32).backward()
    ref = {n: getattr(sae, n).detach().double().clone().requires_grad_(True) for n in PARAMS}
    _reference_loss(ref, x.double(), 4, arch, dead, 6).backward()
    for n in PARAMS:
        got, want = getattr(sae, n).grad, ref[n].grad
        assert got is not None and want is not None
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), n
    assert float(sae.W_enc.grad[dead].abs().sum()) > 0  # AuxK reaches the dead latents' encoder rows


def test_the_dense_encoder_gradients_cuda_uses_equal_the_sparse_ones():
    """CUDA takes dense_encoder_grads (deterministic GEMMs); on CPU it equals the sparse backward."""
    from itda.sae.kernels import dense_encoder_grads, kept_pre

    g = torch.Generator().manual_seed(9)
    x = torch.randn(30, 12, generator=g, requires_grad=True)
    w = torch.randn(40, 12, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = torch.relu(x @ w.T + b)
        kept, idx = pre.topk(5, dim=1)
    grad_out = torch.randn(30, 5, generator=g)
    kept_pre(x, w, b, kept, idx).backward(grad_out)
    masked = torch.where(kept > 0, grad_out, torch.zeros_like(grad_out))
    for got, want in zip((x.grad, w.grad, b.grad), dense_encoder_grads(x, w, masked, idx), strict=True):
        assert got is not None and torch.allclose(got, want, atol=1e-5)
