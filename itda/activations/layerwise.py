"""Models larger than memory: run them layer by layer from their safetensors shards.

The model is built from its own transformers classes with parameters on the meta device
(buffers such as rotary frequencies are real), so attention masks, rotary embeddings and
norms are the library's own code. Embeddings are loaded once; each decoder block's weights
are read tensor by tensor (safe_open(...).get_tensor, through the index's weight map, never a
whole shard) just before the block runs, the block processes the whole resident batch in
micro-chunks, and its weights are dropped again. A background thread reads the next block
while the current one computes (into pinned memory on CUDA). Blocks past the deepest requested
layer, the final norm and the LM head are never loaded.
"""

from __future__ import annotations

import json
import math
import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from itda.activations.hookpoints import find_blocks
from itda.errors import ItdaInputError

SKIP_PREFIXES = ("lm_head.", "model.norm.", "transformer.ln_f.", "model.final_layernorm.", "norm.", "ln_f.")


@dataclass
class WeightIndex:
    """Checkpoint tensor name -> shard file, from model.safetensors.index.json or a single file."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path) -> "WeightIndex":
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ItdaInputError(f"{index}: not a valid safetensors index ({exc})") from None
        elif (folder / "model.safetensors").exists():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
                weight_map = {k: "model.safetensors" for k in fh.keys()}
        else:
            raise ItdaInputError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        return cls(folder, weight_map)

    def checkpoint_name(self, param: str) -> str | None:
        """The checkpoint's name for a model parameter (tolerates a missing/extra top-level prefix)."""
        if param in self.weight_map:
            return param
        tail = param.split(".", 1)[1] if "." in param else param
        if tail in self.weight_map:
            return tail
        for prefix in ("model.", "transformer."):
            if prefix + param in self.weight_map:
                return prefix + param
        return None

    def read(self, names: dict[str, str], device: torch.device, dtype: torch.dtype, pin: bool = False) -> dict[str, torch.Tensor]:
        """{param: tensor} for {param: checkpoint name}, grouped by shard, tensor by tensor."""
        by_shard: dict[str, list[tuple[str, str]]] = {}
        for param, ckpt in names.items():
            by_shard.setdefault(self.weight_map[ckpt], []).append((param, ckpt))
        out = {}
        for shard, items in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt", device="cpu") as fh:
                for param, ckpt in items:
                    t = fh.get_tensor(ckpt)
                    t = t.to(dtype) if t.is_floating_point() else t
                    if pin:
                        t = t.pin_memory()
                    out[param] = t.to(device, non_blocking=True) if device.type != "cpu" else t
        return out

    def nbytes(self, names: list[str]) -> int:
        total = 0
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(self.weight_map[n], []).append(n)
        for shard, items in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt") as fh:
                for n in items:
                    sl = fh.get_slice(n)
                    total += math.prod(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
        return total


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


def _slice_batch(obj, start: int, stop: int, batch: int):
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_slice_batch(o, start, stop, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice_batch(o, start, stop, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice_batch(v, start, stop, batch) for k, v in obj.items()}
    return obj


def _to_meta(module: torch.nn.Module) -> None:
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


class LayerwiseModel:
    """A transformers model whose decoder blocks are loaded from disk one at a time.

    With max_layer set, `model` serves forward passes that stop (StopForward) at or before
    block max_layer: later blocks, the final norm and the LM head are never read. With
    max_layer=None every block streams and the final norm and LM head are loaded too, so full
    forward passes (logits, the CE-loss score) work.
    """

    def __init__(self, folder: str | Path, *, max_layer: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", micro_batch: int = 8, prefetch: bool = True):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.folder = Path(folder)
        self.index = WeightIndex.open(self.folder)
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = max(1, micro_batch)
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        from itda.activations.models import is_causal_lm_class

        cls = AutoModelForCausalLM if any(is_causal_lm_class(a) for a in archs) else AutoModel
        with init_empty_weights(include_buffers=False):
            self.model = cls.from_config(config, dtype=dtype)
        self.model.eval().requires_grad_(False)
        for name, buf in list(self.model.named_buffers()):
            if buf.device != self.device:
                mod = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
                mod._buffers[name.rsplit(".", 1)[-1]] = buf.to(self.device)
        self.blocks_path, self.blocks = find_blocks(self.model)
        self.full = max_layer is None
        self.max_layer = len(self.blocks) - 1 if max_layer is None else max_layer
        if not 0 <= self.max_layer < len(self.blocks):
            raise ItdaInputError(f"layer {self.max_layer} out of range: the model has {len(self.blocks)} blocks")
        self._load_resident()
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        # CUDA: host-to-device copies of the next block run on their own stream
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bytes_read = 0
        for i, block in enumerate(self.blocks):
            if i <= self.max_layer:
                self._patch(i, block)

    # -- weights -----------------------------------------------------------------------------
    def _names(self, module: torch.nn.Module, prefix: str) -> dict[str, str]:
        names = {}
        for pname, _ in module.named_parameters():
            full = f"{prefix}{pname}"
            ckpt = self.index.checkpoint_name(full)
            if ckpt is None:
                raise ItdaInputError(f"{self.folder}: checkpoint has no tensor for parameter '{full}'")
            names[pname] = ckpt
        return names

    def _load_resident(self) -> None:
        """Load every parameter outside the blocks, except the final norm and the LM head."""
        block_prefix = self.blocks_path + "."
        groups: dict[int, list[str]] = {}  # tied parameters share one object
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(pname)
        # tied input/output embeddings: the checkpoint may hold only one of the two names
        io_names = []
        tie = bool(getattr(self.model.config, "tie_word_embeddings", False))
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            mod = getattr(self.model, getter, lambda: None)()
            if mod is not None and getattr(mod, "weight", None) is not None:
                io_names += [n for n, p in self.model.named_parameters(remove_duplicate=False) if p is mod.weight]
        if tie and len(io_names) >= 2:
            merged = [n for g in groups.values() if set(g) & set(io_names) for n in g]
            for key in [k for k, g in groups.items() if set(g) & set(io_names)]:
                del groups[key]
            groups[-1] = list(dict.fromkeys(merged))
        names = {}
        tied = set()
        for group in groups.values():
            wanted = [n for n in group if not n.startswith(block_prefix) and (self.full or not n.startswith(SKIP_PREFIXES))]
            if not wanted:
                continue
            ckpt = next((c for c in map(self.index.checkpoint_name, group) if c is not None), None)
            if ckpt is None:
                tied.update(wanted)
                continue
            for n in wanted:
                names[n] = ckpt
        tensors = self.index.read(names, self.device, self.dtype)
        self.model.load_state_dict(tensors, strict=False, assign=True)
        if self.full and tied and getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        self.resident_bytes = sum(t.numel() * t.element_size() for t in tensors.values())

    def _read_block(self, i: int) -> dict[str, torch.Tensor]:
        names = self._names(self.blocks[i], f"{self.blocks_path}.{i}.")
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                tensors = self.index.read(names, self.device, self.dtype, pin=True)
            self._copy_stream.synchronize()
        else:
            tensors = self.index.read(names, self.device, self.dtype)
        self.bytes_read += sum(t.numel() * t.element_size() for t in tensors.values())
        return tensors

    def _take(self, i: int) -> dict[str, torch.Tensor]:
        with self._lock:
            fut = self._pending.pop(i, None)
        tensors = fut.result() if fut is not None else self._read_block(i)
        nxt = i + 1 if i < self.max_layer else 0  # after the deepest block: block 0 of the next batch
        if self._pool is not None:
            with self._lock:
                if nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._read_block, nxt)
        return tensors

    def _patch(self, i: int, block: torch.nn.Module) -> None:
        original = block.forward
        owner = self

        def forward(self_block, hidden_states, *args, **kwargs):
            tensors = owner._take(i)
            self_block.load_state_dict(tensors, strict=True, assign=True)
            try:
                batch = hidden_states.shape[0]
                outs = []
                for s in range(0, batch, owner.micro_batch):
                    e = min(s + owner.micro_batch, batch)
                    outs.append(original(hidden_states[s:e], *_slice_batch(args, s, e, batch),
                                         **_slice_batch(kwargs, s, e, batch)))
            finally:
                _to_meta(self_block)
                del tensors
            if isinstance(outs[0], tuple):
                return (torch.cat([o[0] for o in outs]),) + tuple(outs[0][1:])
            return torch.cat(outs)

        block.forward = types.MethodType(forward, block)

    def block_bytes(self, i: int) -> int:
        return self.index.nbytes(list(self._names(self.blocks[i], f"{self.blocks_path}.{i}.").values()))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pending.clear()


def checkpoint_params(folder: str | Path) -> int:
    """Number of parameters in a checkpoint folder (read from the safetensors headers only)."""
    total = 0
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            total += sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())
    return total


def default_memory_budget(device: torch.device) -> int:
    """Half of the free memory of the device."""
    from itda.pursuit.gram import _available_bytes

    return _available_bytes(device) // 2
