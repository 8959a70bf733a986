"""SAE initialisations: each picks decoder rows; one shared rule sets b_dec and the encoder.

A spec is `kaiming`, `orthogonal`, `data`, `mean-subtracted`, `centroid-subtracted`,
`outliers`, `itda:DICT` or `transfer:SAE_OR_DICT`. Every function takes a sample of
activations [S, D] and a torch.Generator and returns unit decoder rows [F, D]; `initialise`
then sets b_dec (geometric median, mean or zero) and, except for `kaiming` (sparsify's
default: encoder kaiming-uniform, decoder = its normalised copy), the encoder to the decoder
rows times one scalar fitted by least squares on the sample. A sample of extreme size (see
model.activation_units) is initialised in power-of-two units and the SAE scaled back, exactly;
new_sae refuses, before allocating, an SAE whose initialisation cannot fit in free memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from itda.configfields import FieldError
from itda.errors import ItdaInputError
from itda.sae.model import SaeConfig, TopKSAE, activation_units

B_DEC_RULES = ("median", "mean", "zero")
FILL_RULES = ("data", "kaiming", "outliers")
OUTLIER_PCS = 16  # `outliers`: principal components projected out before ranking samples
ENCODER_FIT_ROWS = 4096  # sample rows the encoder scale is fitted on
ENCODER_FIT_BYTES = 2**30  # the fit's [rows, F] pre-activations and [rows, k, D] gathered rows, per chunk


class InitSpec(NamedTuple):
    name: str
    path: str | None = None


def parse_init(spec: str) -> InitSpec:
    name, _, path = spec.partition(":")
    if name in ("itda", "transfer"):
        if not path:
            raise FieldError("init", f"{name} needs a file: {name}:PATH")
        return InitSpec(name, path)
    if name not in ROW_INITS or path:
        raise FieldError("init", f"unknown {{field}} {spec!r}; choose one of {', '.join(INIT_NAMES)}")
    return InitSpec(name)


def unit_rows(w: Tensor) -> Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def geometric_median(x_SD: Tensor, iters: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm in float64, started at the mean."""
    x = x_SD.to(torch.float64)
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp(min=1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            m = new
            break
        m = new
    return m.to(torch.float32)


def decoder_bias(sample_SD: Tensor, rule: str) -> Tensor:
    if rule == "median":
        return geometric_median(sample_SD)
    if rule == "mean":
        return sample_SD.to(torch.float64).mean(0).to(torch.float32)
    if rule == "zero":
        return torch.zeros(sample_SD.shape[1])
    raise FieldError("b_dec", f"unknown {{field}} {rule!r}; choose one of {', '.join(B_DEC_RULES)}")


# -- decoder rows ------------------------------------------------------------------------------
def kaiming_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """nn.Linear's default weights: uniform(-1/sqrt(D), 1/sqrt(D)) (not normalised here)."""
    bound = 1.0 / math.sqrt(sample_SD.shape[1])
    return (torch.rand(n, sample_SD.shape[1], generator=gen) * 2 - 1) * bound


def orthogonal_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """Blocks of orthonormal rows (QR of Gaussian blocks of D rows each)."""
    d = sample_SD.shape[1]
    blocks = []
    for s in range(0, n, d):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        blocks.append(q.T[: min(d, n - s)])
    return torch.cat(blocks).to(torch.float32)


def _pick(sample_SD: Tensor, n: int, gen: torch.Generator) -> Tensor:
    if sample_SD.shape[0] < n:
        raise ItdaInputError(f"this init needs at least {n} sample activations, got {sample_SD.shape[0]}")
    return sample_SD[torch.randperm(sample_SD.shape[0], generator=gen)[:n]]


def data_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """Random activations minus b_dec."""
    return _pick(sample_SD, n, gen) - b_dec


def mean_subtracted_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """Random activations minus the sample mean."""
    return _pick(sample_SD, n, gen) - sample_SD.mean(0)


def spherical_kmeans(x_SD: Tensor, c: int, gen: torch.Generator, iters: int = 20) -> tuple[Tensor, Tensor]:
    """Centroids [C, D] (in the data's scale) and assignments [S] by cosine k-means."""
    unit = unit_rows(x_SD)
    cent = unit[torch.randperm(x_SD.shape[0], generator=gen)[:c]].clone()
    assign = torch.zeros(x_SD.shape[0], dtype=torch.int64)
    for _ in range(iters):
        assign = (unit @ cent.T).argmax(1)
        sums = torch.zeros_like(cent).index_add_(0, assign, unit)
        empty = sums.norm(dim=1) == 0
        cent = torch.where(empty[:, None], cent, unit_rows(sums))
    means = torch.zeros_like(cent).index_add_(0, assign, x_SD)
    counts = torch.bincount(assign, minlength=c).clamp(min=1)
    return means / counts[:, None].to(x_SD.dtype), assign


def centroid_subtracted_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """Random activations minus the mean of their cosine k-means cluster (C = sqrt(S) clusters)."""
    x = _pick(sample_SD, max(n, min(sample_SD.shape[0], 4 * n)), gen)
    c = max(2, int(math.sqrt(x.shape[0])))
    cent, assign = spherical_kmeans(x, c, gen)
    return (x - cent[assign])[:n]


def outlier_rows(n: int, sample_SD: Tensor, gen: torch.Generator, b_dec: Tensor) -> Tensor:
    """The n samples farthest from the top OUTLIER_PCS principal subspace (after centring), centred."""
    centred = sample_SD - sample_SD.mean(0)
    if centred.shape[0] < n:
        raise ItdaInputError(f"this init needs at least {n} sample activations, got {centred.shape[0]}")
    p = min(OUTLIER_PCS, min(centred.shape) - 1)
    _, _, v = torch.linalg.svd(centred.to(torch.float64), full_matrices=False)
    top = v[:p].to(torch.float32)
    resid = centred - (centred @ top.T) @ top
    order = torch.argsort(resid.norm(dim=1), descending=True, stable=True)
    return centred[order[:n]]


RowInit = Callable[[int, Tensor, torch.Generator, Tensor], Tensor]
ROW_INITS: dict[str, RowInit] = {
    "kaiming": kaiming_rows,
    "orthogonal": orthogonal_rows,
    "data": data_rows,
    "mean-subtracted": mean_subtracted_rows,
    "centroid-subtracted": centroid_subtracted_rows,
    "outliers": outlier_rows,
}
INIT_NAMES = (*ROW_INITS, "itda:DICT", "transfer:SAE_OR_DICT")


def atom_rows(
    atoms_ND: Tensor,
    n: int,
    sample_SD: Tensor,
    gen: torch.Generator,
    b_dec: Tensor,
    *,
    fill: str | None = "data",
    crop: bool = False,
    centre: bool,
) -> Tensor:
    """Dictionary atoms as decoder rows, in order of addition.

    `centre`: each unit atom a becomes r a - b_dec (r = the sample's median norm), the direction
    from b_dec to a typical activation along a, as the SAE's decoder sees it.
    More latents than atoms: the rest by `fill` (random activations minus b_dec, kaiming or outliers).
    Fewer latents than atoms: the first n atoms when `crop`, else an error.
    """
    atoms = atoms_ND.to(torch.float32)
    if atoms.shape[1] != sample_SD.shape[1]:
        raise ItdaInputError(f"the dictionary has d={atoms.shape[1]}, the activations d={sample_SD.shape[1]}")
    if centre:
        atoms = unit_rows(atoms * sample_SD.norm(dim=1).median() - b_dec)
    if n < atoms.shape[0]:
        if not crop:
            raise FieldError(
                "crop",
                f"{n} latents < {atoms.shape[0]} atoms: raise {{latents}} or pass {{field}} "
                f"to keep the first {n} atoms",
                others=("latents",),
            )
        return atoms[:n].clone()
    if n == atoms.shape[0]:
        return atoms.clone()
    if fill not in FILL_RULES:
        raise FieldError(
            "fill", f"{n} latents > {atoms.shape[0]} atoms: give a fill rule ({{field}} {' or '.join(FILL_RULES)})"
        )
    rest = ROW_INITS[fill](n - atoms.shape[0], sample_SD, gen, b_dec)
    return torch.cat([atoms, unit_rows(rest)])


def fit_encoder_scale(
    w_dec_FD: Tensor, b_dec: Tensor, sample_SD: Tensor, k: int, max_rows: int = ENCODER_FIT_ROWS
) -> float:
    """Scalar s minimising ||(x - b) - s * D^T topk(relu(D (x - b)))||^2 over the sample.

    Rows go in chunks of at most ENCODER_FIT_BYTES of temporaries (one chunk for F * k * D of
    ordinary size, so the sums are those of a single pass).
    """
    x = sample_SD[:max_rows] - b_dec
    n, d = w_dec_FD.shape
    k = min(k, n)
    rows = max(1, ENCODER_FIT_BYTES // (4 * (2 * n + k * d)))
    num = den = 0.0
    for s in range(0, x.shape[0], rows):
        xs = x[s : s + rows]
        acts, idx = torch.relu(xs @ w_dec_FD.T).topk(k, dim=1)
        y = torch.einsum("bk,bkd->bd", acts, w_dec_FD[idx])
        num += float((xs * y).sum())
        den += float((y * y).sum())
    return num / den if den > 0 else 1.0


def init_bytes(cfg: SaeConfig, spec: InitSpec, sample_rows: int) -> int:
    """Peak CPU bytes of new_sae: the SAE (2 F D + F + D float32), three [F, D] float32 temporaries
    (rows, unit rows, encoder rows), one chunk of the encoder fit over the sample (not for kaiming
    or transfer) and, for orthogonal, three float64 [D, D] blocks of its QR."""
    f, d = cfg.n_latents, cfg.d_in
    fit_rows = 0 if spec.name in ("kaiming", "transfer") else min(sample_rows, ENCODER_FIT_ROWS)
    fit = min(ENCODER_FIT_BYTES, fit_rows * 4 * (2 * f + min(cfg.k, f) * d))
    qr = 3 * 8 * d * d if spec.name == "orthogonal" else 0
    return 4 * (2 * f * d + f + d) + 4 * 3 * f * d + fit + qr


def initialise(
    sae: TopKSAE,
    spec: InitSpec,
    sample_SD: Tensor,
    *,
    seed: int = 0,
    b_dec: str = "median",
    fill: str | None = "data",
    crop: bool = False,
    centre_atoms: bool = True,
    encoder_gain: float = 1.0,
) -> dict:
    """Set sae's weights in place from spec and the sample; returns what was done (for metadata).

    Non-kaiming encoders are the unit decoder rows times the least-squares scale of the sample
    (fit_encoder_scale) times encoder_gain."""
    cfg = sae.cfg
    sample = sample_SD.to(torch.float32).cpu()
    if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
        raise ItdaInputError(f"init sample has shape {tuple(sample.shape)}, the SAE d_in={cfg.d_in}")
    gen = torch.Generator().manual_seed(seed)
    info: dict = {"init": spec.name if spec.path is None else f"{spec.name}:{spec.path}", "b_dec": b_dec, "seed": seed}
    if spec.name == "transfer":
        from itda.sae.io import load_sae_or_none

        assert spec.path is not None  # parse_init requires one for transfer and itda
        other = load_sae_or_none(spec.path)
        if other is not None:
            return _copy_sae(sae, other.sae, info)
    units = activation_units(sample)  # 1.0 for ordinary activations; extreme ones are initialised in units
    if units != 1.0:
        sample = sample * (1.0 / units)
        info["units"] = units
    bias = decoder_bias(sample, b_dec)
    if spec.name in ("itda", "transfer"):
        from itda.dictionary import Dictionary

        assert spec.path is not None
        atoms = Dictionary.load(spec.path).atoms
        rows = atom_rows(atoms, cfg.n_latents, sample, gen, bias, fill=fill, crop=crop, centre=centre_atoms)
        fill_used = fill if cfg.n_latents > atoms.shape[0] else None
        info.update(atoms=int(atoms.shape[0]), fill=fill_used, centre_atoms=centre_atoms)
    else:
        rows = ROW_INITS[spec.name](cfg.n_latents, sample, gen, bias)
    w_dec = unit_rows(rows)
    if spec.name == "kaiming":
        w_enc = rows
    else:
        scale = fit_encoder_scale(w_dec, bias, sample, cfg.k) * encoder_gain
        w_enc = w_dec * scale
        info["encoder_scale"] = scale
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_enc)
        sae.b_enc.zero_()
        sae.b_dec.copy_(bias)
    sae.scale_biases_(units)  # back to the activations' own units (exact)
    return info


def _copy_sae(sae: TopKSAE, other: TopKSAE, info: dict) -> dict:
    if other.cfg.d_in != sae.cfg.d_in or other.cfg.n_latents != sae.cfg.n_latents:
        raise ItdaInputError(
            f"transfer: that SAE is d_in={other.cfg.d_in}, {other.cfg.n_latents} latents; "
            f"this one d_in={sae.cfg.d_in}, {sae.cfg.n_latents} latents"
        )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(other, name))
        if sae.arch.uses_threshold and other.arch.uses_threshold:
            sae.threshold.copy_(other.threshold)  # the EMA goes on from the learned threshold
    info["b_dec"] = "transferred"
    return info


def new_sae(
    cfg: SaeConfig, spec: InitSpec | str, sample_SD: Tensor, device: torch.device | str = "cpu", **kwargs
) -> tuple[TopKSAE, dict]:
    """A TopKSAE initialised by spec on the sample (kwargs: seed, b_dec, fill, crop, centre_atoms,
    encoder_gain); refused if it cannot fit in memory."""
    from itda.resources import check_fits

    spec = parse_init(spec) if isinstance(spec, str) else spec
    check_fits(
        init_bytes(cfg, spec, sample_SD.shape[0]),
        f"initialising an SAE of {cfg.n_latents} latents x d={cfg.d_in}",
        "cpu",
    )
    sae = TopKSAE(cfg)
    info = initialise(sae, spec, sample_SD, **kwargs)
    return sae.to(device), info
