"""TopK SAE, initialisations, trainer and SAE files, against references written here."""

import json
import math

import pytest
import torch

from itda.builder import build_dictionary
from itda.cli.options import flag
from itda.configfields import FieldError
from itda.errors import ItdaInputError
from itda.sae import (
    SaeConfig,
    SaeMeta,
    SaeTrainer,
    TopKSAE,
    TrainConfig,
    evaluate_sae,
    load_sae,
    new_sae,
    save_sae,
    shuffled_batches,
)
from itda.sae.init import geometric_median, parse_init
from itda.sae.io import dictionary_as_sae, export_saelens, export_sparsify
from itda.sae.model import batch_topk
from itda.synthetic import synthetic_with_features


def random_sae(d=16, f=48, k=5, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d, f, k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(f, d, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(f, generator=g))
        sae.W_dec.copy_(torch.randn(f, d, generator=g))
        sae.b_dec.copy_(torch.randn(d, generator=g))
    sae.normalise_decoder()
    return sae


def reference_topk(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    """Plain float64 TopK forward: relu(W_enc (x - b_dec) + b_enc), k largest per row, decode."""
    we, be, wd, bd = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.double()
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        pre = torch.clamp(we @ (x[i] - bd) + be, min=0)
        top = sorted(range(len(pre)), key=lambda j: -float(pre[j]))[: sae.cfg.k]
        out[i] = sum(pre[j] * wd[j] for j in top) + bd
    return out


def test_topk_forward_matches_plain_reference():
    sae = random_sae()
    x = torch.randn(40, 16) * 2
    ref = reference_topk(sae, x)
    assert torch.allclose(sae.reconstruct(x).double(), ref, atol=1e-5)
    out = sae(x)
    fvu_ref = float(((x.double() - ref) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum())
    assert abs(float(out.fvu.detach()) - fvu_ref) < 1e-5
    assert out.top_indices.shape == (40, 5)


def test_batch_topk_keeps_the_batch_largest():
    pre = torch.rand(8, 30)
    acts, idx = batch_topk(pre, 3)
    dense = torch.zeros_like(pre).scatter_add_(1, idx, acts)
    assert int((dense > 0).sum()) == 24
    threshold = pre.reshape(-1).sort(descending=True).values[23]
    assert torch.equal(dense > 0, pre >= threshold)
    assert torch.allclose(dense[dense > 0], pre[dense > 0])


def test_auxk_matches_formula():
    sae = random_sae(seed=1)
    x = torch.randn(30, 16)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents
    k_aux = 6
    out = sae(x, dead, k_aux)
    # by formula, in float64
    we, be, wd, bd = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    xd = x.double()
    pre = torch.clamp((xd - bd) @ we.T + be, min=0)
    e = xd - reference_topk(sae, x)
    total = 0.0
    for i in range(30):
        cand = sorted(torch.nonzero(dead).squeeze(1).tolist(), key=lambda j: -float(pre[i, j]))[:k_aux]
        e_hat = sum(pre[i, j] * wd[j] for j in cand)
        total += float(((e[i] - e_hat) ** 2).sum())
    expected = min(16 / k_aux, 1.0) * total / float(((xd - xd.mean(0)) ** 2).sum())
    assert abs(float(out.auxk_loss) - expected) < 1e-5 * max(1.0, expected)
    assert float(sae(x).auxk_loss) == 0.0


def test_step_keeps_decoder_unit_and_projects_gradients():
    sae = random_sae(seed=2)
    x = torch.randn(64, 16)
    sae(x).fvu.backward()
    before = sae.W_dec.grad.norm(dim=1).clone()
    sae.remove_parallel_grads()
    along = (sae.W_dec.grad * sae.W_dec).sum(1).detach()
    assert float((along.abs() / before.clamp(min=1e-12)).max()) < 1e-5
    trainer = SaeTrainer(sae, TrainConfig(steps=3, lr=1e-2))
    trainer.fit([x, x, x], progress=False)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)


def test_geometric_median_against_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    x[:20] += 50  # outliers pull the mean, not the median
    m = geometric_median(x)

    def cost(p):
        return float((x - p).norm(dim=1).sum())

    for _ in range(50):
        assert cost(m) <= cost(m + 0.01 * torch.randn(3, generator=g)) + 1e-6
    assert float(m.norm()) < float(x.mean(0).norm())


@pytest.fixture(scope="module")
def synthetic():
    data, feats = synthetic_with_features(20_000, 64, n_features=128, active=3, zipf=0.5, noise=0.02, seed=1)
    return data.acts, feats


@pytest.fixture(scope="module")
def synthetic_dict(synthetic, tmp_path_factory):
    x, _ = synthetic
    d = build_dictionary(x.split(2048), k=8, min_cosine=0.8)
    path = tmp_path_factory.mktemp("dict") / "d.safetensors"
    d.save(path)
    return path, d


def recovery(sae: TopKSAE, feats: torch.Tensor) -> float:
    """Mean over true features of the best cosine with a decoder row."""
    return float((feats @ sae.W_dec.detach().T).max(1).values.mean())


def test_inits_recover_true_features(synthetic, synthetic_dict):
    x, feats = synthetic
    path, d = synthetic_dict
    rec = {}
    for spec in ("kaiming", "orthogonal", "data", "mean-subtracted", "centroid-subtracted", "outliers", f"itda:{path}"):
        sae, info = new_sae(SaeConfig(64, 256, 4), spec, x[:8192], seed=0, crop=True)
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)
        rec[spec.split(":")[0]] = recovery(sae, feats)
    # random directions in 64-d sit near 0.35; data-informed rows start close to the true features
    assert rec["kaiming"] < 0.45 and rec["orthogonal"] < 0.45
    for name in ("data", "mean-subtracted", "centroid-subtracted", "outliers", "itda"):
        assert rec[name] > rec["kaiming"] + 0.3, (name, rec)
    # ITDA atoms are the activations MP explains worst: closer to single features than random rows
    assert rec["itda"] > rec["data"]


def test_training_recovers_features_and_itda_starts_ahead(synthetic, synthetic_dict):
    x, feats = synthetic
    path, _ = synthetic_dict
    final = {}
    for spec in ("kaiming", f"itda:{path}"):
        sae, _ = new_sae(SaeConfig(64, 256, 4), spec, x[:8192], seed=0, crop=True)
        # constant lr: the comparison is of inits over 200 steps (a decay there slows kaiming's recovery most)
        cfg = TrainConfig(steps=200, lr=1e-3, lr_decay=0.0)
        hist = SaeTrainer(sae, cfg).fit(shuffled_batches(x, 512), progress=False)
        final[spec.split(":")[0]] = (hist[0].fvu, hist[-1].fvu, recovery(sae, feats))
    assert final["itda"][0] < final["kaiming"][0]  # first-step FVU
    assert final["itda"][1] < final["kaiming"][1]  # FVU after 200 steps
    assert final["itda"][2] > 0.9 and final["kaiming"][2] > 0.8


def test_itda_init_fill_and_crop_rules(synthetic, synthetic_dict):
    x, _ = synthetic
    path, d = synthetic_dict
    n = len(d)
    sae, info = new_sae(SaeConfig(64, n + 50, 4), f"itda:{path}", x[:8192], seed=0, fill="data", centre_atoms=False)
    assert torch.allclose(sae.W_dec[:n], d.atoms, atol=1e-6)
    assert info["fill"] == "data" and info["atoms"] == n
    with pytest.raises(FieldError, match="give a fill rule") as err:
        new_sae(SaeConfig(64, n + 50, 4), f"itda:{path}", x[:8192], fill=None)
    assert err.value.field == "fill" and "--" not in str(err.value)
    with pytest.raises(FieldError, match="raise latents or pass crop") as err:
        new_sae(SaeConfig(64, n - 1, 4), f"itda:{path}", x[:8192])
    assert err.value.field == "crop"
    assert "raise --latents or pass --crop" in err.value.named(flag("crop"), flag)  # as the CLI reports it
    with pytest.raises(ItdaInputError, match="d=64"):
        new_sae(SaeConfig(32, n, 4), f"itda:{path}", x[:8192, :32])
    with pytest.raises(FieldError, match="unknown init") as err:
        parse_init("he-normal")
    assert err.value.field == "init"


def test_itda_init_centres_atoms_by_b_dec_and_fills_with_outliers(synthetic, synthetic_dict):
    x, _ = synthetic
    path, d = synthetic_dict
    n, sample = len(d), x[:8192].double()
    sae, info = new_sae(
        SaeConfig(64, n + 20, 4), f"itda:{path}", x[:8192], seed=0, b_dec="mean", fill="outliers", centre_atoms=True
    )
    b = sample.mean(0)
    r = sample.norm(dim=1).median()
    want = d.atoms.double() * r - b  # a typical activation along each atom, seen from b_dec
    assert torch.allclose(sae.W_dec[:n].double(), want / want.norm(dim=1, keepdim=True), atol=1e-5)
    centred = sample - b
    top = torch.linalg.svd(centred, full_matrices=False)[2][:16]
    far = (centred - centred @ top.T @ top).norm(dim=1).argsort(descending=True)[:20]
    fill = centred[far] / centred[far].norm(dim=1, keepdim=True)
    assert torch.allclose(sae.W_dec[n:].double(), fill, atol=1e-5)
    assert info["centre_atoms"] is True and info["fill"] == "outliers"
    plain, _ = new_sae(SaeConfig(64, n, 4), f"itda:{path}", x[:8192], seed=0, b_dec="mean", centre_atoms=False)
    assert torch.allclose(plain.W_dec, d.atoms, atol=1e-6)  # the atoms themselves when not centred


def test_encoder_is_the_least_squares_scale_of_the_decoder_times_the_gain(synthetic, synthetic_dict):
    x, _ = synthetic
    path, d = synthetic_dict
    sample = x[:4096]  # the rows the scale is fitted on (ENCODER_FIT_ROWS)
    sae, info = new_sae(SaeConfig(64, len(d), 4), f"itda:{path}", sample, seed=0, b_dec="mean")
    D, xc = sae.W_dec.detach().double(), sample.double() - sample.double().mean(0)

    def loss(s):  # sum ||x_c - s * D^T topk(relu(D x_c))||^2 in float64
        acts, idx = torch.relu(xc @ D.T).topk(4, dim=1)
        return float((xc - s * torch.einsum("bk,bkd->bd", acts, D[idx])).pow(2).sum())

    grid = torch.linspace(0.5, 1.5, 101, dtype=torch.float64) * info["encoder_scale"]
    best = float(grid[torch.tensor([loss(s) for s in grid]).argmin()])
    assert best == pytest.approx(info["encoder_scale"], rel=0.011)  # the grid's minimum is the fitted scale
    assert torch.allclose(sae.W_enc.double(), info["encoder_scale"] * D, rtol=1e-5, atol=1e-7)
    twice, info2 = new_sae(SaeConfig(64, len(d), 4), f"itda:{path}", sample, b_dec="mean", encoder_gain=2.0)
    assert info2["encoder_scale"] == pytest.approx(2 * info["encoder_scale"], rel=1e-6)
    assert torch.allclose(twice.W_enc, 2 * sae.W_enc, rtol=1e-5, atol=1e-7)


def test_transfer_copies_an_sae_exactly(tmp_path, synthetic):
    x, _ = synthetic
    src = random_sae(d=64, f=96, k=4, seed=3)
    save_sae(src, tmp_path / "a.safetensors")
    sae, info = new_sae(SaeConfig(64, 96, 4), f"transfer:{tmp_path / 'a.safetensors'}", x[:1000])
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, n), getattr(src, n))
    with pytest.raises(ItdaInputError, match="transfer"):
        new_sae(SaeConfig(64, 97, 4), f"transfer:{tmp_path / 'a.safetensors'}", x[:1000])


def _state(trainer: SaeTrainer) -> list[torch.Tensor]:
    out = [getattr(trainer.sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    for p in trainer.opt.state.values():
        out += [p["exp_avg"].clone(), p["exp_avg_sq"].clone(), p["step"].clone()]
    return out + [trainer.since_fired_F.clone()]


def test_resume_from_checkpoint_is_identical(tmp_path, synthetic):
    x, _ = synthetic
    cfg = TrainConfig(
        steps=30, lr=1e-3, dead_after_tokens=2048, resample="itda", resample_every=7, lr_warmup_steps=4, lr_decay=0.5
    )  # the checkpoint at step 15 falls where the decay starts: the resumed run must follow the same schedule

    def fresh():
        sae, _ = new_sae(SaeConfig(64, 128, 4), "data", x[:4096], seed=0)
        with torch.no_grad():
            sae.b_enc[96:] = -1e3  # dead from the start: resampling must happen
        return SaeTrainer(sae, cfg)

    whole = fresh()
    whole.fit(shuffled_batches(x, 256, seed=5), progress=False)

    class Crash(Exception):
        pass

    def crash_at_17(trainer, stats):
        if stats.step == 17:
            raise Crash

    ck = tmp_path / "ck.safetensors"
    with pytest.raises(Crash):
        fresh().fit(
            shuffled_batches(x, 256, seed=5), checkpoint=ck, checkpoint_every=5, progress=False, callback=crash_at_17
        )
    resumed, _ = SaeTrainer.load_checkpoint(ck)
    assert resumed.step_count == 15
    resumed.fit(shuffled_batches(x, 256, seed=5), progress=False)
    assert whole.resampled_total > 0  # the resampling path ran and is part of what must match
    for a, b in zip(_state(whole), _state(resumed), strict=True):
        assert torch.equal(a, b)


def reference_lr(step: int, steps: int, warmup: int, decay: float) -> float:
    """Linear warm-up over `warmup` steps, then flat, then linear to 0 over the last decay·steps steps."""
    w = 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
    n = round(decay * steps)
    start = steps - n
    return w * (1.0 if n == 0 or step < start else 1.0 - (step - start) / n)


@pytest.mark.parametrize("warmup,decay", [(0, 0.0), (5, 0.0), (0, 0.2), (7, 1.0), (3, 0.45)])
def test_lr_schedule_is_applied_each_step(synthetic, warmup, decay):
    x, _ = synthetic
    cfg = TrainConfig(steps=20, lr=1e-3, lr_warmup_steps=warmup, lr_decay=decay)
    sae, _ = new_sae(SaeConfig(64, 128, 4), "data", x[:4096], seed=0)
    trainer = SaeTrainer(sae, cfg)
    used: list[float] = []
    first_move: list[float] = []
    before = sae.b_enc.detach().clone()

    def record(tr, stats):
        used.append(tr.opt.param_groups[0]["lr"])
        if stats.step == 1:  # Adam's first step moves each weight by lr * g / (|g| + eps): at most lr
            first_move.append(float((tr.sae.b_enc.detach() - before).abs().max()))

    trainer.fit(shuffled_batches(x, 256, seed=1), progress=False, callback=record)
    want = [1e-3 * reference_lr(i, 20, warmup, decay) for i in range(20)]
    assert used == pytest.approx(want, rel=1e-12)
    assert first_move[0] == pytest.approx(want[0], rel=1e-3)
    assert min(used) > 0


def test_lr_schedule_fields_are_checked():
    with pytest.raises(FieldError, match="lr_decay"):
        TrainConfig(lr_decay=1.5).validate()
    with pytest.raises(FieldError, match="lr_warmup_steps"):
        TrainConfig(lr_warmup_steps=-1).validate()


def test_itda_resampling_revives_dead_latents():
    data, _ = synthetic_with_features(8192, 32, n_features=64, active=2, seed=4)
    x = data.acts
    sae, _ = new_sae(SaeConfig(32, 128, 2), "kaiming", x[:2048], seed=0)
    with torch.no_grad():
        sae.b_enc[64:] = -1e3  # half the latents can never fire
    base = TrainConfig(steps=12, lr=1e-3, dead_after_tokens=1024, resample_every=6)
    t = SaeTrainer(sae, TrainConfig(**{**base.__dict__, "resample": "itda"}))
    hist = t.fit(shuffled_batches(x, 512), progress=False)
    assert sum(s.resampled for s in hist) >= 32
    assert int(t.dead_mask()[64:].sum()) < 64
    # a revived latent's decoder row is an activation minus b_dec, unit norm
    revived = torch.nonzero(sae.b_enc[64:] > -1).squeeze(1) + 64
    assert len(revived) and torch.allclose(sae.W_dec[revived].norm(dim=1), torch.ones(len(revived)), atol=1e-5)


def test_sae_file_roundtrip_and_evaluation(tmp_path):
    sae = random_sae(seed=5)
    save_sae(sae, tmp_path / "s.safetensors", SaeMeta(model="m", hookpoint="resid_post.3"))
    loaded = load_sae(tmp_path / "s.safetensors")
    assert loaded.meta.hookpoint == "resid_post.3"
    x = torch.randn(50, 16)
    assert torch.equal(loaded.sae.reconstruct(x), sae.reconstruct(x))
    rep = evaluate_sae(sae, x.split(7))
    ref = reference_topk(sae, x)
    fvu = float(((x.double() - ref) ** 2).sum() / ((x.double() - x.double().mean(0)) ** 2).sum())
    assert abs(rep.fvu - fvu) < 1e-6 and rep.tokens == 50 and rep.l0 <= 5


def test_exports_load_back_through_itda(tmp_path):
    sae = random_sae(seed=6)
    meta = SaeMeta(model="smollm2-135m", hookpoint="resid_post.8")
    x = torch.randn(20, 16)
    export_saelens(sae, meta, tmp_path / "sl")
    hp = export_sparsify(sae, meta, tmp_path / "sp")
    assert hp.name == "layers.8"
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.8.hook_resid_post"
    for folder in (tmp_path / "sl", tmp_path / "sp", hp):
        other = load_sae(folder).sae
        assert torch.allclose(other.reconstruct(x), sae.reconstruct(x), atol=1e-6)
    assert load_sae(hp).meta.hookpoint == "resid_post.8"
    # an export replaces an earlier export, never another folder
    export_saelens(sae, meta, tmp_path / "sl")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ItdaInputError, match="not an earlier output"):
        export_saelens(sae, meta, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_dictionary_as_sae_takes_top_correlations(synthetic_dict):
    _, d = synthetic_dict
    loaded = dictionary_as_sae(d, k=3)
    x = torch.randn(10, 64)
    corr = torch.clamp(x @ d.atoms.T, min=0)
    vals, idx = corr.topk(3, dim=1)
    ref = torch.einsum("bk,bkd->bd", vals, d.atoms[idx])
    assert torch.allclose(loaded.sae.reconstruct(x), ref, atol=1e-5)
    assert math.isclose(loaded.sae.cfg.n_latents, len(d))
