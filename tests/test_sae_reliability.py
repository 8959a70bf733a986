"""SAE reliability: byte-identical resume after SIGKILL, SAE metadata validated at load, memory
bounds before allocating, and extreme finite activations (1e30, 1e-30, near float32's limit).

Every bad input gives one line `error: ...` with exit code 2 and writes nothing.
"""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import kill_after_checkpoints, run_bad, run_ok, synthetic_acts_file
from safetensors.torch import save_file

import itda.resources
from itda.activations.files import load_activations, save_activations
from itda.errors import ItdaInputError
from itda.sae import (
    SaeConfig,
    SaeMeta,
    SaeTrainer,
    TopKSAE,
    TrainConfig,
    evaluate_sae,
    export_saelens,
    export_sparsify,
    load_sae,
    new_sae,
    save_sae,
)
from itda.sae.model import activation_units, auxk_loss
from itda.sae.train import training_bytes
from itda.tensorfile import read_tensor_file, write_tensor_file

ITDA = [sys.executable, "-m", "itda.cli.main"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # every subprocess alike (and fast on a busy machine)
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def random_sae(d=16, f=48, k=5, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d, f, k))
    with torch.no_grad():
        for n in PARAMS:
            getattr(sae, n).copy_(torch.randn(getattr(sae, n).shape, generator=g) * (0.3 if n == "b_enc" else 1.0))
    sae.normalise_decoder()
    return sae


def reference_fvu(sae: TopKSAE, x: torch.Tensor) -> tuple[float, float]:
    """(FVU, mean cosine) of a plain float64 TopK forward of sae on x."""
    we, be, wd, bd = (getattr(sae, n).detach().double() for n in PARAMS)
    x = x.double()
    pre = torch.clamp((x - bd) @ we.T + be, min=0)
    vals, idx = pre.topk(sae.cfg.k, dim=1)
    x_hat = torch.einsum("bk,bkd->bd", vals, wd[idx]) + bd
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    cos = float(((x * x_hat).sum(1) / (x.norm(dim=1) * x_hat.norm(dim=1))).mean())
    return fvu, cos


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    return synthetic_acts_file(tmp_path_factory.mktemp("sae_rel") / "acts.safetensors", 3000, 16, n_features=64, seed=5)


def scaled_copy(acts: Path, factor: float, path: Path) -> Path:
    data = load_activations(acts)
    save_activations(path, data.acts * factor, data.refs)
    return path


def train_args(src, out, *extra):
    return [
        "sae",
        "train",
        str(src),
        "--out",
        str(out),
        "--latents",
        "64",
        "--k",
        "4",
        "--init",
        "data",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "-q",
        *extra,
    ]


# -- extreme finite inputs ---------------------------------------------------------------------------
def test_loss_is_the_plain_formula_on_ordinary_data_and_finite_far_beyond_it():
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 37.5):
        x = torch.randn(64, 16, generator=g) * scale
        a, b = random_sae(), random_sae()
        out = a(x, dead, 6)
        (out.fvu + out.auxk_loss).backward()
        enc = b.encode(x)  # the loss as written before: squares of the raw float32 terms
        err = x - b.decode(enc.top_acts, enc.top_indices)
        tv = (x - x.mean(0)).pow(2).sum()
        fvu, aux = err.pow(2).sum() / tv, auxk_loss(b, enc, err, tv, dead, 6)
        (fvu + aux).backward()
        assert torch.equal(out.fvu, fvu) and torch.equal(out.auxk_loss, aux)
        assert all(torch.equal(getattr(a, n).grad, getattr(b, n).grad) for n in PARAMS)
        assert abs(float(out.fvu.detach()) - reference_fvu(a, x)[0]) < 1e-5
    x = torch.randn(64, 16, generator=g)
    unit = random_sae()(x).fvu.detach()
    for factor in (2.0**100, 2.0**-75):  # the same SAE for x * factor: exactly the same FVU
        big = random_sae()
        big.scale_biases_(factor)
        assert torch.equal(big(x * factor).fvu, unit)
        xs = x * factor  # where squares of the raw terms over- or underflow float32
        plain = float(((xs - big.reconstruct(xs).detach()) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())
        assert not (math.isfinite(plain) and abs(plain - float(unit)) < 1e-3)
    big = random_sae()
    big.scale_biases_(1e30)
    assert abs(float(big(x * 1e30).fvu.detach()) - reference_fvu(big, x * 1e30)[0]) < 1e-4


def test_activation_units_are_powers_of_two_that_leave_ordinary_data_alone():
    x = torch.randn(500, 32)
    assert activation_units(x) == 1.0 and activation_units(x * 1e5) == 1.0 and activation_units(x * 1e-5) == 1.0
    up, down = activation_units(x * 2.0**100), activation_units(x * 2.0**-100)
    assert math.frexp(up)[0] == 0.5 and up / down == 2.0**200
    assert torch.equal((x * 2.0**100) * (1 / up), (x * 2.0**-100) * (1 / down))
    rms = float((x * 2.0**100 / up).double().pow(2).sum(1).mean().sqrt())
    assert 2**-0.5 <= rms <= 2**0.5
    near_max = x / x.abs().max() * 3e38
    assert math.isfinite(activation_units(near_max)) and bool(
        torch.isfinite(near_max * (1 / activation_units(near_max))).all()
    )


def test_extreme_activation_files_train_as_exact_scaled_copies(acts, tmp_path):
    files = {
        "x": acts,
        "up": scaled_copy(acts, 2.0**60, tmp_path / "up.safetensors"),
        "down": scaled_copy(acts, 2.0**-60, tmp_path / "down.safetensors"),
        "1e30": scaled_copy(acts, 1e30, tmp_path / "big.safetensors"),
        "1e-30": scaled_copy(acts, 1e-30, tmp_path / "small.safetensors"),
    }
    saes = {}
    for name, src in files.items():
        run_ok(train_args(src, tmp_path / f"{name}.sae.safetensors"))
        saes[name] = load_sae(tmp_path / f"{name}.sae.safetensors")
        train = saes[name].meta.train
        assert math.isfinite(train["final_train_fvu"]) and 0 < train["heldout"]["fvu"] < 0.8, (name, train)
        assert "seconds" not in train
    up, down = saes["up"], saes["down"]
    assert torch.equal(up.sae.W_enc, down.sae.W_enc) and torch.equal(up.sae.W_dec, down.sae.W_dec)
    assert torch.equal(up.sae.b_dec, down.sae.b_dec * 2.0**120) and torch.equal(up.sae.b_enc, down.sae.b_enc * 2.0**120)
    assert up.meta.train["heldout"] == down.meta.train["heldout"]
    assert abs(saes["1e30"].meta.train["heldout"]["fvu"] - saes["x"].meta.train["heldout"]["fvu"]) < 0.1
    held = load_activations(files["1e30"]).acts[-150:]  # the default --holdout 0.05 of 3000 rows
    fvu, _ = reference_fvu(saes["1e30"].sae, held)
    assert abs(saes["1e30"].meta.train["heldout"]["fvu"] - fvu) < 1e-5
    for name in ("1e30", "1e-30"):  # `sae eval` of the whole file against the float64 reference
        r = run_ok(["sae", "eval", str(tmp_path / f"{name}.sae.safetensors"), str(files[name])])
        got = {ln.split()[0]: float(ln.split()[1]) for ln in r.output.strip().splitlines()}
        fvu, cos = reference_fvu(saes[name].sae, load_activations(files[name]).acts)
        assert abs(got["fvu"] - fvu) < 1e-4 * max(1, fvu) and abs(got["mean_cosine"] - cos) < 1e-4, (
            name,
            got,
            fvu,
            cos,
        )


def test_eval_is_exact_at_float32_limits_and_refuses_what_has_no_fvu(tmp_path):
    sae = random_sae(seed=2)
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    base = evaluate_sae(sae, x.split(128))
    for factor in (2.0**90, 2.0**-90):  # the same SAE for x * factor gives the same report
        other = random_sae(seed=2)
        other.scale_biases_(factor)
        rep = evaluate_sae(other, (x * factor).split(128))
        assert (rep.fvu, rep.mean_cosine, rep.l0) == (base.fvu, base.mean_cosine, base.l0)
    near_max = x / x.abs().max() * 3.0e38  # an ordinary SAE on activations at float32's limit
    rep = evaluate_sae(sae, near_max.split(128))
    fvu, cos = reference_fvu(sae, near_max)
    assert math.isfinite(rep.fvu) and abs(rep.fvu - fvu) < 1e-5 * fvu and abs(rep.mean_cosine - cos) < 1e-5
    save_sae(sae, tmp_path / "s.safetensors")
    np.save(tmp_path / "const.npy", np.ones((50, 16), np.float32))
    np.save(tmp_path / "one.npy", np.ones((1, 16), np.float32))
    run_bad(["sae", "eval", str(tmp_path / "s.safetensors"), str(tmp_path / "const.npy")], "no variance")
    run_bad(["sae", "eval", str(tmp_path / "s.safetensors"), str(tmp_path / "one.npy")], "no variance")
    huge = random_sae(seed=2)
    with torch.no_grad():
        huge.W_enc.mul_(1e38)  # finite weights whose reconstruction overflows
    save_sae(huge, tmp_path / "huge.safetensors")
    np.save(tmp_path / "x.npy", x.numpy())
    run_bad(["sae", "eval", str(tmp_path / "huge.safetensors"), str(tmp_path / "x.npy")], "not finite")


def test_training_refuses_batches_without_variance_and_divergence(acts, tmp_path):
    trainer = SaeTrainer(random_sae(), TrainConfig(steps=2, lr=1e-3))
    with pytest.raises(ItdaInputError, match="at least 2"):
        trainer.step(torch.randn(1, 16))
    with pytest.raises(ItdaInputError, match="no variance"):
        trainer.step(torch.ones(8, 16))
    with torch.no_grad():
        trainer.sae.W_enc.mul_(1e38)  # finite weights whose loss is not
    before = trainer.sae.W_enc.clone()
    with pytest.raises(ItdaInputError, match="training diverged at step 0"):
        trainer.step(torch.randn(8, 16))
    assert torch.equal(trainer.sae.W_enc, before) and trainer.step_count == 0  # refused before the update
    out = tmp_path / "o.safetensors"
    run_bad(train_args(acts, out, "--batch-size", "1"), "--batch-size")
    np.save(tmp_path / "21.npy", np.random.default_rng(0).standard_normal((21, 16)).astype(np.float32))
    run_bad(
        [
            "sae",
            "train",
            str(tmp_path / "21.npy"),
            "--out",
            str(out),
            "--latents",
            "8",
            "--k",
            "2",
            "--batch-size",
            "4",
        ],
        "held-out",
    )  # 5% of 21 rows: one held-out row has no variance
    run_bad(train_args(acts, out, "--lr", "1e10"), "--lr")
    run_bad(train_args(acts, out, "--seed", str(2**40)), "--seed")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_resume_from_a_final_step_checkpoint_writes_the_same_bytes(acts, tmp_path, monkeypatch):
    import itda.sae.io

    whole, out, ck = tmp_path / "whole.safetensors", tmp_path / "o.safetensors", tmp_path / "ck.safetensors"
    run_ok(train_args(acts, whole, "--resample", "itda", "--resample-every", "10", "--dead-after-tokens", "512"))
    real = itda.sae.io.save_sae

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(itda.sae.io, "save_sae", interrupted)
    args = train_args(
        acts,
        out,
        "--resample",
        "itda",
        "--resample-every",
        "10",
        "--dead-after-tokens",
        "512",
        "--checkpoint",
        str(ck),
        "--checkpoint-every",
        "10",
    )
    from cli_helpers import runner

    from itda.cli.main import app

    assert runner.invoke(app, args).exit_code == 130  # killed after its last step and checkpoint
    assert ck.exists() and not out.exists()
    monkeypatch.setattr(itda.sae.io, "save_sae", real)
    run_ok(args)  # resumes with no step left: the record must still hold the last step's FVU
    assert digest(out) == digest(whole) and not ck.exists()
    assert load_sae(out).meta.train["final_train_fvu"] is not None


# -- metadata validated at load ----------------------------------------------------------------------
def _itda_cases():
    def cfg(**kw):
        return lambda h: h["cfg"].update(kw)

    def top(key, value):
        return lambda h: h.__setitem__(key, value)

    return [
        (cfg(k=1000), "cfg.k"),
        (cfg(k=0), "cfg.k"),
        (cfg(k="4"), "cfg.k"),
        (cfg(k=4.0), "cfg.k"),
        (cfg(d_in=True), "cfg.d_in"),
        (cfg(d_in=0), "cfg.d_in"),
        (cfg(n_latents=-1), "cfg.n_latents"),
        (cfg(batch_topk="yes"), "cfg.batch_topk"),
        (cfg(extra=1), "cfg.extra"),
        (cfg(d_in=17), "W_enc"),
        (cfg(n_latents=65), "W_enc"),
        (lambda h: h.pop("cfg"), "'cfg' is missing"),
        (top("cfg", [16, 64, 4]), "'cfg'"),
        (top("format_version", 2), "format version 2"),
        (top("format_version", True), "format_version"),
        (lambda h: h.pop("format_version"), "format_version"),
        (top("model", 5), "'model'"),
        (top("hookpoint", "!!"), "'hookpoint'"),
        (top("tokenizer", ["t"]), "'tokenizer'"),
        (top("init", []), "'init'"),
        (top("train", "fast"), "'train'"),
        (top("include_special", "no"), "'include_special'"),
        (top("itda_version", 1), "'itda_version'"),
    ]


def test_every_itda_sae_header_field_is_checked_at_load(acts, tmp_path):
    good = tmp_path / "good.safetensors"
    save_sae(random_sae(d=16, f=64, k=4), good, SaeMeta(model="m", hookpoint="resid_post.2"))
    header, tensors = read_tensor_file(good)
    failures = []
    cases = _itda_cases() + [("not an object", "must be a JSON object"), ("not json", "not JSON")]
    for i, (change, fragment) in enumerate(cases):
        bad = tmp_path / f"bad{i}.safetensors"
        if isinstance(change, str):  # a header entry that is no JSON object (written without a checksum)
            save_file(tensors, str(bad), metadata={"itda_sae": "[1, 2]" if change == "not an object" else "{cfg:"})
        else:
            entry = json.loads(header["itda_sae"])
            change(entry)
            write_tensor_file(bad, tensors, "itda_sae", entry)
        with pytest.raises(ItdaInputError) as exc:
            load_sae(bad)
        if fragment not in str(exc.value) or str(bad) not in str(exc.value):
            failures.append(f"case {i}: {exc.value}")
        run_bad(["sae", "eval", str(bad), str(acts)], fragment)
        run_bad(["export", str(bad), "--format", "saelens", "--out", str(tmp_path / f"sl{i}")], fragment)
        assert not (tmp_path / f"sl{i}").exists()
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.glob(".*.tmp"))


def test_saelens_and_sparsify_cfg_fields_are_checked_at_load(acts, tmp_path):
    sae, meta = random_sae(d=16, f=64, k=4), SaeMeta(hookpoint="resid_post.2")
    saelens = [
        ({"d_sae": "64"}, "'d_sae'"),
        ({"k": 1000}, "'k'"),
        ({"k": None}, "'k'"),
        ({"d_in": True}, "'d_in'"),
        ({"d_in": 17}, "W_enc"),
        ({"metadata": []}, "'metadata'"),
        ({"metadata": {"hook_name": 3}}, "metadata.hook_name"),
        ({"apply_b_dec_to_input": "true"}, "apply_b_dec_to_input"),
        ({"normalize_activations": "layer_norm"}, "normalize"),
        ({"architecture": 5}, "'architecture'"),
        (None, "must be a JSON object"),
    ]
    sparsify = [
        ({"num_latents": "64"}, "'num_latents'"),
        ({"k": 1000}, "'k'"),
        ({"d_in": 0}, "'d_in'"),
        ({"num_latents": 0, "expansion_factor": 0}, "'expansion_factor'"),
        ({"skip_connection": "false"}, "skip_connection"),
        ({"activation": "groupmax"}, "'activation'"),
        ({"transcode": True}, "transcode"),
        (None, "must be a JSON object"),
    ]
    for kind, cases in (("saelens", saelens), ("sparsify", sparsify)):
        for i, (change, fragment) in enumerate(cases):
            root = tmp_path / f"{kind}{i}"
            folder = export_saelens(sae, meta, root) if kind == "saelens" else export_sparsify(sae, meta, root)
            cfg = json.loads((folder / "cfg.json").read_text())
            (folder / "cfg.json").write_text(json.dumps([cfg] if change is None else {**cfg, **change}))
            with pytest.raises(ItdaInputError) as exc:
                load_sae(folder)
            assert fragment in str(exc.value) and str(folder) in str(exc.value), (kind, i, str(exc.value))
            run_bad(["sae", "eval", str(folder), str(acts)], fragment)


def test_a_tampered_checkpoint_is_refused_before_anything_is_allocated(acts, tmp_path):
    x = load_activations(acts).acts
    trainer = SaeTrainer(new_sae(SaeConfig(16, 64, 4), "data", x[:1024])[0], TrainConfig(steps=4, lr=1e-3))
    ck = tmp_path / "ck.safetensors"
    trainer.fit(x.split(128), checkpoint=ck, checkpoint_every=2, progress=False)
    header, tensors = read_tensor_file(ck)
    cases = [
        ({"sae": {"d_in": 16, "n_latents": 10**9, "k": 4, "batch_topk": False}}, "W_enc"),
        ({"sae": {"d_in": 16, "n_latents": 64, "k": 1000, "batch_topk": False}}, "sae.k"),
        ({"step_count": -1}, "step_count"),
        ({"tokens_seen": "many"}, "tokens_seen"),
        ({"extra": []}, "extra"),
    ]
    for i, (change, fragment) in enumerate(cases):
        bad = tmp_path / f"ck{i}.safetensors"
        write_tensor_file(bad, tensors, "itda_sae_checkpoint", {**json.loads(header["itda_sae_checkpoint"]), **change})
        with pytest.raises(ItdaInputError, match=fragment):
            SaeTrainer.load_checkpoint(bad)
    run_bad(train_args(acts, tmp_path / "o.safetensors", "--checkpoint", str(tmp_path / "ck1.safetensors")), "sae.k")


# -- memory bounds -----------------------------------------------------------------------------------
def test_training_bytes_count_what_a_step_really_holds():
    cfg, batch = SaeConfig(16, 256, 4), 96
    sae = random_sae(d=16, f=256, k=4)
    with torch.no_grad():
        sae.b_enc[128:] = -1e3  # dead latents: the AuxK path runs
    trainer = SaeTrainer(sae, TrainConfig(steps=1, lr=1e-3, dead_after_tokens=1))
    trainer.step(torch.randn(batch, 16))
    trainer.step(torch.randn(batch, 16))
    held = sum(p.numel() * p.element_size() for p in sae.parameters())
    held += sum(p.grad.numel() * p.grad.element_size() for p in sae.parameters())
    held += sum(t.numel() * t.element_size() for st in trainer.opt.state.values() for t in st.values())
    held += trainer.since_fired_F.numel() * 8
    step = 4 * (3 * batch * cfg.n_latents + 2 * cfg.n_latents * cfg.d_in)  # [B, F] tensors, two [F, D] temporaries
    assert abs(training_bytes(cfg, batch) - (held + step)) <= 64  # Adam's scalar step counters


def test_memory_is_checked_before_allocating(acts, tmp_path, monkeypatch):
    out = tmp_path / "o.safetensors"
    t0 = time.perf_counter()
    run_bad(train_args(acts, out, "--latents", str(10**10)), "needs about")  # about 20 TiB
    assert time.perf_counter() - t0 < 30 and not out.exists()
    monkeypatch.setattr(itda.resources, "available_bytes", lambda device="cpu": 8 * 2**20)
    run_bad(train_args(acts, out, "--latents", "8192"), "more than the 8.0 MiB free")
    monkeypatch.setattr(itda.resources, "available_bytes", lambda device="cpu": 2**20)
    with pytest.raises(ItdaInputError, match="initialising an SAE of 8192 latents x d=16 needs about 2.5 MiB"):
        new_sae(SaeConfig(16, 8192, 4), "kaiming", torch.randn(100, 16))
    monkeypatch.setattr(itda.resources, "available_bytes", lambda device="cpu": None)  # unknown: not refused
    run_ok(train_args(acts, out, "--latents", "8192", "--steps", "2", "--k", "2", "--init", "kaiming"))
    assert not list(tmp_path.glob(".*.tmp"))


# -- SIGKILL and resume ------------------------------------------------------------------------------
KILLS = 10


@pytest.mark.slow
def test_repeated_sigkill_then_resume_is_byte_identical(tmp_path):
    acts = synthetic_acts_file(tmp_path / "acts.safetensors", 20_000, 48, n_features=256, seed=3)
    common = [
        str(acts),
        "--latents",
        "256",
        "--k",
        "8",
        "--init",
        "data",
        "--steps",
        "400",
        "--batch-size",
        "200",
        "--dead-after-tokens",
        "2000",
        "--resample",
        "itda",
        "--resample-every",
        "25",
        "-q",
    ]
    ref = tmp_path / "ref" / "whole.safetensors"
    reference = subprocess.Popen(
        ITDA + ["sae", "train", *common, "--out", str(ref)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, ck = tmp_path / "o.safetensors", tmp_path / "ck.safetensors"
    cmd = ITDA + ["sae", "train", *common, "--out", str(out), "--checkpoint", str(ck), "--checkpoint-every", "2"]
    kills = kill_after_checkpoints(
        lambda: subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), ck, out, KILLS
    )
    assert kills == KILLS
    assert reference.wait() == 0, reference.stderr.read()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(ref)
    assert not ck.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_model_input_training_resumes_byte_identically(tmp_path):
    from tiny_models import saved_model_and_corpus

    model, corpus, _ = saved_model_and_corpus(tmp_path, 60, seed=0)
    common = [
        str(model),
        "--layer",
        "1",
        "--corpus",
        str(corpus),
        "--context",
        "32",
        "--latents",
        "64",
        "--k",
        "4",
        "--steps",
        "120",
        "--batch-size",
        "64",
        "--init-sample",
        "256",
        "--init",
        "data",
        "-q",
    ]
    ref, out, ck = tmp_path / "ref.safetensors", tmp_path / "o.safetensors", tmp_path / "ck.safetensors"
    cmd = ITDA + ["sae", "train", *common, "--out", str(out), "--checkpoint", str(ck), "--checkpoint-every", "2"]
    reference = subprocess.Popen(
        ITDA + ["sae", "train", *common, "--out", str(ref)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not ck.exists():
        time.sleep(0.01)
    time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists() and not out.exists()
    assert reference.wait() == 0, reference.stderr.read()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(ref) and not ck.exists() and not list(tmp_path.glob(".*.tmp"))
