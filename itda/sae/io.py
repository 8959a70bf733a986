"""SAE files: itda's own format, and the folders SAELens and sparsify load natively.

- itda: one `.safetensors` file, tensors W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D] (and, for
  the architectures that learn one, threshold [1] float64) and a JSON header `itda_sae` (SaeConfig,
  model, hookpoint, tokenizer, init and training record). A header with `batch_topk` and no `arch`
  (itda before architectures) is a `topk` SAE: BatchTopK was a training option, inference TopK.
- SAELens (v6): `cfg.json` + `sae_weights.safetensors` with W_enc [D, F], b_enc [F], W_dec [F, D],
  b_dec [D]; architecture `topk` (with k), or `jumprelu` (with threshold [F], every entry the learned
  one; training_architecture and its k, widths in the metadata) for batchtopk and matryoshka_batchtopk.
- sparsify (topk only): `<out>/<hookpoint>/cfg.json` + `sae.safetensors` with encoder.weight [F, D],
  encoder.bias [F], W_dec [F, D], b_dec [D]; hookpoint folders are named like `layers.10`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from itda.atomic import atomic_dir
from itda.errors import ItdaInputError
from itda.sae.arch import ARCH_NAMES, get_arch
from itda.sae.model import SaeConfig, TopKSAE
from itda.tensorfile import read_tensor_file, write_tensor_file
from itda.version import __version__

SAE_KEY = "itda_sae"
SAE_FORMAT_VERSION = 1
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_MIN_VERSION = "6.0.0"


@dataclass
class SaeMeta:
    """What the SAE was trained on and how; stored as JSON in the safetensors header."""

    model: str | None = None
    hookpoint: str | None = None
    tokenizer: str | None = None
    init: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    include_special: bool = False


class LoadedSae(NamedTuple):
    sae: TopKSAE
    meta: SaeMeta


def save_sae(sae: TopKSAE, path: str | os.PathLike, meta: SaeMeta | None = None) -> None:
    """Write sae and meta as an itda SAE file (atomically); weights with NaN or inf are refused."""
    meta = meta or SaeMeta()
    header = {
        "format_version": SAE_FORMAT_VERSION,
        "itda_version": __version__,
        "cfg": sae.cfg.to_dict(),
        **meta.__dict__,
    }
    tensors = {n: getattr(sae, n).detach().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.arch.uses_threshold:
        tensors["threshold"] = sae.threshold.detach().cpu().reshape(1).to(torch.float64)
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ItdaInputError(f"{path}: not written: the SAE's {name} contains NaN or inf (training diverged?)")
    write_tensor_file(path, tensors, SAE_KEY, header)


_MISSING = object()


class Fields:
    """Typed reads from one JSON object of a file's metadata; every error names the file and the field."""

    def __init__(self, where: str | os.PathLike, obj: Any, prefix: str = ""):
        if not isinstance(obj, dict):
            what = f"field '{prefix.rstrip('.')}'" if prefix else "the metadata"
            raise ItdaInputError(f"{where}: {what} must be a JSON object, got {obj!r}")
        self.where, self.obj, self.prefix = where, obj, prefix

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.obj:
            return self.obj[key]
        if default is _MISSING:
            raise ItdaInputError(f"{self.where}: field '{self.prefix}{key}' is missing")
        return default

    def fail(self, key: str, want: str) -> ItdaInputError:
        return ItdaInputError(f"{self.where}: field '{self.prefix}{key}' must be {want}, got {self.obj.get(key)!r}")

    def integer(
        self, key: str, low: int = 1, high: int | None = None, high_name: str = "", default: Any = _MISSING
    ) -> int:
        v = self.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(key, "an integer")
        if v < low or (high is not None and v > high):
            raise self.fail(
                key, f"an integer >= {low}" if high is None else f"an integer from {low} to {high_name} = {high}"
            )
        return v

    def boolean(self, key: str, default: Any = _MISSING, must: bool | None = None) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool) or (must is not None and v != must):
            raise self.fail(
                key, "true or false" if must is None else f"{'true' if must else 'false'} (all itda supports)"
            )
        return v

    def string(
        self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None, none: bool = False
    ) -> str | None:
        v = self.get(key, default)
        if v is None and none:
            return None
        if not isinstance(v, str) or (choices is not None and v not in choices):
            want = "a string" if choices is None else " or ".join(repr(c) for c in choices)
            raise self.fail(key, want + (" or null" if none else ""))
        return v

    def mapping(self, key: str, default: Any = _MISSING) -> dict:
        v = self.get(key, default)
        if not isinstance(v, dict):
            raise self.fail(key, "a JSON object")
        return v


_CFG_KEYS = ("arch", "matryoshka_widths", "batch_topk")  # an itda header's keys besides d_in, n_latents, k


def checked_config(
    where: str | os.PathLike,
    raw: Any,
    names: tuple[str, str, str] = ("d_in", "n_latents", "k"),
    prefix: str = "cfg.",
    itda_header: bool = True,
) -> SaeConfig:
    """A SaeConfig from a metadata object: d_in >= 1, n_latents >= 1, 1 <= k <= n_latents (ints); in an
    itda header also arch (a registered name, default topk), matryoshka_widths (ints, as the arch needs)
    and the legacy batch_topk (a bool, ignored), and no other key.

    `names` are the file's keys for d_in, n_latents and k. Errors name `where` and the field.
    """
    f = Fields(where, raw, prefix)
    d_key, f_key, k_key = names
    d, n = f.integer(d_key), f.integer(f_key)
    k = f.integer(k_key, 1, n, f_key)
    if not itda_header:
        return SaeConfig(d, n, k)
    f.boolean("batch_topk", False)
    extra = sorted(set(raw) - {*names, *_CFG_KEYS})
    if extra:
        raise ItdaInputError(f"{where}: unknown field '{prefix}{extra[0]}'")
    arch = str(f.string("arch", "topk", choices=ARCH_NAMES))
    widths = f.get("matryoshka_widths", [])
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise f.fail("matryoshka_widths", "a list of integers")
    return arch_config(where, SaeConfig(d, n, k, arch, tuple(widths)), prefix)


def arch_config(where: str | os.PathLike, cfg: SaeConfig, prefix: str = "cfg.") -> SaeConfig:
    """cfg, refused (naming `where` and the field) when its fields do not suit its architecture."""
    problem = get_arch(cfg.arch).config_error(cfg)
    if problem is not None:
        raise ItdaInputError(f"{where}: field '{prefix}{problem[0]}' {problem[1]}")
    return cfg


def check_threshold(path: str | os.PathLike, t: torch.Tensor | None, n: int = 1) -> float:
    """A stored threshold: a float tensor [n] whose entries are one finite value >= 0; that value."""
    if t is None:
        raise ItdaInputError(f"{path}: missing tensor 'threshold' (the architecture's inference threshold)")
    if tuple(t.shape) != (n,) or not t.is_floating_point():
        raise ItdaInputError(f"{path}: threshold must be a float tensor [{n}], got {t.dtype} {list(t.shape)}")
    value = float(t[0])
    if not (0.0 <= value < float("inf")) or not bool((t == t[0]).all()):
        raise ItdaInputError(
            f"{path}: threshold must be one finite value >= 0 for every latent (itda reads JumpReLU SAEs "
            "with a global threshold, as BatchTopK training learns)"
        )
    return value


def check_weights(path: Path, tensors: dict[str, torch.Tensor], d: int, f: int) -> None:
    """W_enc [F, D], b_enc [F], W_dec [F, D], b_dec [D]: present, floating point, finite."""
    want = {"W_enc": (f, d), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise ItdaInputError(f"{path}: missing tensor '{name}'")
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ItdaInputError(f"{path}: {name} must be a float tensor {list(shape)}, got {t.dtype} {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ItdaInputError(f"{path}: {name} contains NaN or inf")


def _build(cfg: SaeConfig, tensors: dict[str, torch.Tensor], device, threshold: float = 0.0) -> TopKSAE:
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name].to(torch.float32))
        sae.threshold.fill_(threshold)
    return sae.to(device)


def load_itda_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedSae:
    path = Path(path)
    if not path.is_file():
        raise ItdaInputError(f"{path}: no such SAE file")
    header, tensors = read_tensor_file(path)
    if SAE_KEY not in header:
        raise ItdaInputError(f"{path}: not an itda SAE (no '{SAE_KEY}' metadata)")
    try:
        raw = json.loads(header[SAE_KEY])
    except json.JSONDecodeError as exc:
        raise ItdaInputError(f"{path}: SAE metadata is not JSON ({exc})") from None
    cfg, meta = _checked_header(path, raw)
    check_weights(path, tensors, cfg.d_in, cfg.n_latents)
    threshold = check_threshold(path, tensors.get("threshold")) if get_arch(cfg.arch).uses_threshold else 0.0
    return LoadedSae(_build(cfg, tensors, device, threshold), meta)


def _checked_header(path: Path, raw: Any) -> tuple[SaeConfig, SaeMeta]:
    """Every field of an itda SAE header, typed and in range (unknown top-level fields are ignored)."""
    f = Fields(path, raw)
    version = f.integer("format_version", 0)
    if version != SAE_FORMAT_VERSION:
        raise ItdaInputError(
            f"{path}: SAE format version {version} is not supported (this itda reads version {SAE_FORMAT_VERSION})"
        )
    f.string("itda_version", None, none=True)
    cfg = checked_config(path, f.get("cfg"))
    meta = SaeMeta(
        model=f.string("model", None, none=True),
        hookpoint=_hookpoint_field(f, "hookpoint"),
        tokenizer=f.string("tokenizer", None, none=True),
        init=f.mapping("init", {}),
        train=f.mapping("train", {}),
        include_special=f.boolean("include_special", False),
    )
    return cfg, meta


def _hookpoint_field(f: Fields, key: str) -> str | None:
    """An optional hookpoint name that itda can parse."""
    from itda.activations.hookpoints import parse_hookpoint

    name = f.string(key, None, none=True)
    if name is not None:
        try:
            parse_hookpoint(name)
        except ItdaInputError:
            raise f.fail(key, "a hookpoint itda can parse") from None
    return name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ItdaInputError(f"{path}: not readable JSON ({exc})") from None


def load_saelens(folder: Path, device: str | torch.device = "cpu") -> LoadedSae:
    """A SAELens v6 `topk` folder, or a `jumprelu` one with one threshold for every latent (a BatchTopK
    export); cfg.json is checked field by field before the weights are read."""
    where = folder / "cfg.json"
    cfg = _read_json(where)
    f = Fields(where, cfg)
    architecture = f.string("architecture")
    if architecture not in ("topk", "jumprelu"):
        raise ItdaInputError(f"{folder}: SAELens architecture {architecture!r}; itda reads 'topk' and 'jumprelu'")
    f.boolean("apply_b_dec_to_input", True, must=True)
    f.string("normalize_activations", "none", choices=("none",))
    f.boolean("rescale_acts_by_decoder_norm", False, must=False)
    md_raw = f.get("metadata", None)
    md = Fields(where, {} if md_raw is None else md_raw, "metadata.")
    if architecture == "topk":
        sc = checked_config(where, cfg, ("d_in", "d_sae", "k"), prefix="", itda_header=False)
    else:
        sc = _jumprelu_config(where, f, md)
    meta = SaeMeta(model=md.string("model_name", None, none=True), hookpoint=_hookpoint_field(md, "hook_name"))
    _, tensors = read_tensor_file(folder / SAELENS_WEIGHTS)
    if "W_enc" in tensors:
        tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    check_weights(folder, tensors, sc.d_in, sc.n_latents)
    threshold = check_threshold(folder, tensors.get("threshold"), sc.n_latents) if architecture == "jumprelu" else 0.0
    return LoadedSae(_build(sc, tensors, device, threshold), meta)


def _jumprelu_config(where: Path, f: Fields, md: Fields) -> SaeConfig:
    """A jumprelu cfg.json's SaeConfig: d_in, d_sae, and the training architecture (batchtopk or
    matryoshka_batchtopk), its k and widths from metadata.training_architecture_details."""
    d, n = f.integer("d_in"), f.integer("d_sae")
    trained = md.string("training_architecture", "batchtopk", choices=("batchtopk", "matryoshka_batchtopk"))
    raw = md.mapping("training_architecture_details", {})
    if isinstance(raw.get("k"), float) and raw["k"].is_integer():
        raw = {**raw, "k": int(raw["k"])}  # SAELens's own BatchTopK k is a float
    prefix = "metadata.training_architecture_details."
    details = Fields(where, raw, prefix)
    k = details.integer("k", 1, n, "d_sae")
    widths = details.get("matryoshka_widths", []) if trained == "matryoshka_batchtopk" else []
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        raise details.fail("matryoshka_widths", "a list of integers")
    return arch_config(where, SaeConfig(d, n, k, str(trained), tuple(widths)), prefix)


def _sparsify_config(where: Path, cfg: Any) -> SaeConfig:
    """sparsify's cfg.json: a plain TopK SAE, d_in >= 1, num_latents (0: d_in * expansion_factor), 1 <= k <= latents."""
    f = Fields(where, cfg)
    f.string("activation", "topk", choices=("topk",))
    f.boolean("skip_connection", False, must=False)
    f.boolean("transcode", False, must=False)
    f.boolean("multi_topk", False)
    f.boolean("normalize_decoder", True)
    d = f.integer("d_in")
    n = f.integer("num_latents", 0, default=0) or d * f.integer("expansion_factor", 1, default=32)
    return SaeConfig(d, n, f.integer("k", 1, n, "the number of latents", default=32))


def load_sparsify(folder: Path, device: str | torch.device = "cpu") -> LoadedSae:
    """A sparsify hookpoint folder (cfg.json + sae.safetensors); cfg.json is checked before the weights are read."""
    sc = _sparsify_config(folder / "cfg.json", _read_json(folder / "cfg.json"))
    _, raw = read_tensor_file(folder / SPARSIFY_WEIGHTS)
    tensors = {
        "W_enc": raw.get("encoder.weight"),
        "b_enc": raw.get("encoder.bias"),
        "W_dec": raw.get("W_dec"),
        "b_dec": raw.get("b_dec"),
    }
    tensors = {k: v for k, v in tensors.items() if v is not None}
    check_weights(folder, tensors, sc.d_in, sc.n_latents)
    return LoadedSae(_build(sc, tensors, device), SaeMeta(hookpoint=_hookpoint_from_sparsify(folder.name)))


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedSae:
    """An itda SAE file, a SAELens folder, or a sparsify hookpoint folder (or a run folder with one)."""
    sae = load_sae_or_none(path, device)
    if sae is None:
        raise ItdaInputError(f"{path}: not an SAE (an itda SAE file, a SAELens folder or a sparsify folder)")
    return sae


def load_sae_or_none(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedSae | None:
    """(sae, meta) when path holds an SAE; None when it is something else (e.g. a dictionary)."""
    path = Path(path)
    if path.is_file():
        header, _ = read_tensor_file(path)
        return load_itda_sae(path, device) if SAE_KEY in header else None
    if not path.is_dir():
        raise ItdaInputError(f"{path}: no such file or folder")
    if (path / SAELENS_WEIGHTS).is_file():
        return load_saelens(path, device)
    if (path / SPARSIFY_WEIGHTS).is_file():
        return load_sparsify(path, device)
    subs = [p for p in sorted(path.iterdir()) if (p / SPARSIFY_WEIGHTS).is_file()]
    if len(subs) == 1:
        return load_sparsify(subs[0], device)
    if len(subs) > 1:
        raise ItdaInputError(
            f"{path}: holds {len(subs)} sparsify hookpoints ({', '.join(p.name for p in subs)}); name one"
        )
    return None


def dictionary_as_sae(dictionary, k: int | None = None) -> LoadedSae:
    """A dictionary as a TopK SAE: W_dec = W_enc = atoms, zero biases, k = the dictionary's k.

    Its encoder takes the k largest correlations at once (one step of what MP does k times),
    so it is a starting point for training, not a replacement for MP inference.
    """
    n = len(dictionary)
    k = dictionary.meta.k if k is None else k
    if n == 0:
        raise ItdaInputError("the dictionary has no atoms")
    if not 1 <= k <= n:
        raise ItdaInputError(f"k must be between 1 and the {n} atoms, got {k}")
    sae = TopKSAE(SaeConfig(dictionary.d, n, min(k, n)))
    atoms = dictionary.atoms.detach().to("cpu", torch.float32)
    with torch.no_grad():
        sae.W_dec.copy_(atoms)
        sae.W_enc.copy_(atoms)
    m = dictionary.meta
    meta = SaeMeta(
        model=m.model,
        hookpoint=m.hookpoint,
        tokenizer=m.tokenizer,
        init={"init": "dictionary", "atoms": n},
        include_special=bool(m.build.get("include_special", False)),
    )
    return LoadedSae(sae, meta)


# -- export --------------------------------------------------------------------------------------
def sparsify_hookpoint(hookpoint: str | None) -> str:
    """sparsify's folder name: `layers.L` for resid_post L, the module path otherwise."""
    if not hookpoint:
        return "sae"
    from itda.activations.hookpoints import parse_hookpoint

    hp = parse_hookpoint(hookpoint)
    if hp.kind == "resid_post":
        return f"layers.{hp.layer}"
    if hp.kind in ("attn_out", "mlp_out"):
        return f"layers.{hp.layer}.{'self_attn' if hp.kind == 'attn_out' else 'mlp'}"
    return hookpoint


def _hookpoint_from_sparsify(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "layers" and parts[1].isdigit():
        return f"resid_post.{parts[1]}"
    return name


def saelens_hook_name(hookpoint: str | None) -> str | None:
    if not hookpoint:
        return None
    from itda.activations.hookpoints import parse_hookpoint

    hp = parse_hookpoint(hookpoint)
    names = {
        "resid_post": "hook_resid_post",
        "resid_pre": "hook_resid_pre",
        "attn_out": "hook_attn_out",
        "mlp_out": "hook_mlp_out",
    }
    return f"blocks.{hp.layer}.{names[hp.kind]}" if hp.kind in names else hookpoint


def saelens_cfg(
    architecture: str,
    d_in: int,
    d_sae: int,
    *,
    head: dict,
    tail: dict,
    model: str | None,
    hookpoint: str | None,
    context_size: int,
    metadata: dict,
) -> dict:
    """A SAELens cfg.json: architecture and widths, `head`, the fields every itda export shares, `tail`, and
    the metadata (SAELens version, model, hook, context, exporter) with `metadata` added."""
    return {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        **head,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **tail,
        "metadata": {
            "sae_lens_version": SAELENS_MIN_VERSION,
            "model_name": model,
            "hook_name": saelens_hook_name(hookpoint),
            "context_size": context_size,
            "exported_by": f"itda {__version__}",
            **metadata,
        },
    }


def export_saelens(sae: TopKSAE, meta: SaeMeta, out: str | os.PathLike, context_size: int = 128) -> Path:
    """The SAE's SAELens inference form (the architecture's: topk, or jumprelu with its threshold)."""
    fields, extra, training = sae.arch.saelens(sae)
    head = {"k": fields.pop("k")} if "k" in fields else {}
    cfg = saelens_cfg(
        sae.arch.saelens_architecture,
        sae.cfg.d_in,
        sae.cfg.n_latents,
        head=head,
        tail=fields,
        model=meta.model,
        hookpoint=meta.hookpoint,
        context_size=context_size,
        metadata=training,
    )
    tensors = {
        "W_enc": sae.W_enc.detach().cpu().float().T.contiguous(),
        "b_enc": sae.b_enc.detach().cpu().float().contiguous(),
        "W_dec": sae.W_dec.detach().cpu().float().contiguous(),
        "b_dec": sae.b_dec.detach().cpu().float().contiguous(),
        **extra,
    }
    out = Path(out)
    with atomic_dir(out, replace_if="cfg.json") as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return out


def export_sparsify(sae: TopKSAE, meta: SaeMeta, out: str | os.PathLike) -> Path:
    """A topk SAE as sparsify's folder; other architectures are refused (sparsify has no JumpReLU)."""
    if sae.arch.name != "topk":
        raise ItdaInputError(
            f"sparsify loads TopK SAEs only; this is a {sae.arch.name} SAE (JumpReLU at inference): "
            "export it with --format saelens"
        )
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, sae.cfg.n_latents // sae.cfg.d_in),
        "normalize_decoder": True,
        "num_latents": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": sae.cfg.d_in,
    }
    tensors = {
        "encoder.weight": sae.W_enc.detach().cpu().float().contiguous(),
        "encoder.bias": sae.b_enc.detach().cpu().float().contiguous(),
        "W_dec": sae.W_dec.detach().cpu().float().contiguous(),
        "b_dec": sae.b_dec.detach().cpu().float().contiguous(),
    }
    out = Path(out)
    name = sparsify_hookpoint(meta.hookpoint)
    with atomic_dir(out, replace_if="itda_export.json") as tmp:
        (tmp / name).mkdir(parents=True)
        save_file(tensors, str(tmp / name / SPARSIFY_WEIGHTS))
        (tmp / name / "cfg.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "itda_export.json").write_text(
            json.dumps({"format": "sparsify", "hookpoints": [name], "model": meta.model}, indent=2)
        )
    return out / name
