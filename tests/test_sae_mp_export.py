"""A dictionary exported as SAELens's matching_pursuit SAE, loaded by the real SAELens (optional:
`pip install -e '.[interop]'`), against itda's MP and a plain float64 MP written here."""

import pytest
import torch

from itda.dictionary import Dictionary, DictionaryMeta
from itda.sae.export_mp import export_saelens_mp, signed_codes

pytestmark = pytest.mark.interop
N_TOKENS, D, N_ATOMS, K = 512, 48, 192, 12


def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install -e '.[interop]')")


@pytest.fixture(scope="module")
def setup():
    """Synthetic sparse activations and a dictionary of some of their true features."""
    from itda.synthetic import synthetic_with_features

    data, feats = synthetic_with_features(N_TOKENS, D, n_features=2 * N_ATOMS, active=6, seed=1)
    pick = torch.randperm(2 * N_ATOMS, generator=torch.Generator().manual_seed(2))[:N_ATOMS]
    meta = DictionaryMeta(d=D, k=K, model="tiny", hookpoint="resid_post.3")
    return data.acts, Dictionary(feats[pick].contiguous(), meta=meta)


def mp64(x, atoms, k, nonneg=False, stop_on_repeat=False):
    """float64 MP: dense codes [B, N] and reconstruction. nonneg: pick max relu(c), else max |c|.
    stop_on_repeat: a row stops after a step adding 0 or re-picking an (atom, sign) it already holds."""
    r, a = x.double().clone(), atoms.double()
    b, n = x.shape[0], a.shape[0]
    rows = torch.arange(b)
    codes = torch.zeros(b, n, dtype=torch.float64)
    seen = torch.zeros(b, 2 * n, dtype=torch.bool)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(k):
        c = r @ a.T
        j = (c.clamp(min=0) if nonneg else c.abs()).argmax(1)
        v = c[rows, j].clamp(min=0) if nonneg else c[rows, j]
        v = torch.where(done, torch.zeros_like(v), v)
        codes[rows, j] += v
        r -= v[:, None] * a[j]
        if stop_on_repeat:
            key = j + n * (v < 0)
            done |= seen[rows, key] | (v == 0)
            seen[rows, key] |= v != 0
    return codes, x.double() - r


def fvu(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def itda_mp(d, x):
    codes = d.encode(x, K)
    dense = torch.zeros(x.shape[0], len(d), dtype=torch.float64)
    dense.scatter_add_(1, codes.indices, codes.values.double())
    return dense, d.decode(codes)


def load(d, out, **options):
    export_saelens_mp(d, out, **options)
    sae = sae_lens().SAE.load_from_disk(str(out))
    assert type(sae).__name__ == "MatchingPursuitSAE"
    return sae


def test_signed_export_is_itdas_mp(setup, tmp_path):
    """±atoms, no early stop: SAELens's codes, forward and FVU equal itda's MP and the float64 MP."""
    x, d = setup
    sae = load(d, tmp_path / "mp")
    cfg = sae.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.max_iterations) == (D, 2 * N_ATOMS, K)
    assert cfg.residual_threshold == 0 and not cfg.stop_on_duplicate_support
    assert torch.equal(sae.W_dec, torch.cat([d.atoms, -d.atoms])) and not sae.b_dec.any()
    assert cfg.metadata.exported_by.startswith("itda ") and cfg.metadata.itda_dictionary["signed"]
    assert cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with torch.no_grad():
        acts, out = sae.encode(x), sae(x)
    ours, x_itda = itda_mp(d, x)
    ref, x_ref = mp64(x, d.atoms, K)
    assert torch.allclose(signed_codes(acts, N_ATOMS).double(), ours, atol=1e-5)
    assert torch.allclose(out, x_itda, atol=1e-5)
    assert torch.allclose(ours, ref, atol=1e-4) and torch.allclose(x_itda.double(), x_ref, atol=1e-4)
    assert fvu(x, out) == pytest.approx(fvu(x, x_itda), abs=1e-6)
    assert fvu(x, x_itda) == pytest.approx(fvu(x, x_ref), abs=1e-5)


def test_plain_export_is_nonnegative_mp(setup, tmp_path):
    """Atoms only: SAELens runs non-negative MP (the float64 reference), with a higher FVU than itda's MP."""
    x, d = setup
    sae = load(d, tmp_path / "mp", signed=False)
    assert sae.cfg.d_sae == N_ATOMS and torch.equal(sae.W_dec, d.atoms)
    with torch.no_grad():
        acts, out = sae.encode(x), sae(x)
    ref, x_ref = mp64(x, d.atoms, K, nonneg=True)
    assert (acts >= 0).all() and torch.allclose(acts.double(), ref, atol=1e-5)
    assert torch.allclose(out.double(), x_ref, atol=1e-5)
    assert fvu(x, out) > fvu(x, itda_mp(d, x)[1]) + 0.01


def test_duplicate_support_stop_truncates_signed_mp(setup, tmp_path):
    """SAELens's stop_on_duplicate_support: signed MP cut after the first step that re-picks an atom
    with the same sign (that step included); it bites on some rows, raising the FVU."""
    x, d = setup
    sae = load(d, tmp_path / "mp", stop_on_duplicate_support=True)
    with torch.no_grad():
        acts, out = sae.encode(x), sae(x)
    ref, x_ref = mp64(x, d.atoms, K, stop_on_repeat=True)
    assert torch.allclose(signed_codes(acts, N_ATOMS).double(), ref, atol=1e-5)
    assert torch.allclose(out.double(), x_ref, atol=1e-5)
    full, _ = mp64(x, d.atoms, K)
    assert ((full - ref).abs().amax(1) > 1e-6).any()
    assert fvu(x, out) >= fvu(x, itda_mp(d, x)[1])


def test_api_and_cli_export(setup, tmp_path):
    """itda.api.export and `itda export --format saelens-mp`; SAEs and bad thresholds are refused."""
    from cli_helpers import run_bad, run_ok

    from itda.api import export
    from itda.errors import ItdaInputError
    from itda.sae import SaeConfig, TopKSAE, save_sae

    x, d = setup
    where = export(d, "saelens-mp", tmp_path / "api")
    assert sae_lens().SAE.load_from_disk(str(where)).cfg.d_sae == 2 * N_ATOMS
    d.save(tmp_path / "d.safetensors")
    r = run_ok(["export", str(tmp_path / "d.safetensors"), "--format", "saelens-mp", "--out", str(tmp_path / "c")])
    assert "384 latents, 12 MP steps" in r.output
    args = ["export", str(tmp_path / "d.safetensors"), "--format", "saelens-mp", "--plain", "--k", "4"]
    run_ok(args + ["--out", str(tmp_path / "c")])  # an earlier export is replaced
    assert sae_lens().SAE.load_from_disk(str(tmp_path / "c")).cfg.max_iterations == 4
    save_sae(TopKSAE(SaeConfig(D, 64, 4)), tmp_path / "s.safetensors")
    run_bad(
        ["export", str(tmp_path / "s.safetensors"), "--format", "saelens-mp", "--out", str(tmp_path / "e")], "is an SAE"
    )
    run_bad(
        ["export", str(tmp_path / "d.safetensors"), "--format", "saelens", "--plain", "--out", str(tmp_path / "e")],
        "--plain",
    )
    (tmp_path / "mine").mkdir()
    run_bad(args + ["--out", str(tmp_path / "mine")], "exists and is not")
    with pytest.raises(ItdaInputError, match="residual_threshold"):
        export_saelens_mp(d, tmp_path / "t", residual_threshold=-1.0)
