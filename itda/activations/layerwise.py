"""Models larger than memory: run them layer by layer from their safetensors shards.

The model is built from its own transformers classes with parameters on the meta device
(buffers such as rotary frequencies are real), so attention masks, rotary embeddings and
norms are the library's own code. Embeddings are loaded once; each decoder block's weights
are read tensor by tensor (safe_open(...).get_tensor, through the index's weight map, never a
whole shard) just before the block runs, the block processes the whole resident batch in
micro-chunks, and its weights are dropped again. A background thread reads the next block
while the current one computes (into pinned memory on CUDA). Blocks past the deepest requested
layer, the final norm and the LM head are never loaded. Resident memory does not grow with
depth: parameters are never allocated on the CPU, each block gets its own meta parameters back
after it runs, and the C heap is trimmed after every block.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode

from itda.activations.hookpoints import find_blocks
from itda.activations.lm_classes import is_causal_lm_class
from itda.errors import ItdaInputError
from itda.resources import trim_heap

SKIP_PREFIXES = ("lm_head.", "model.norm.", "transformer.ln_f.", "model.final_layernorm.", "norm.", "ln_f.")


@dataclass
class WeightIndex:
    """Checkpoint tensor name -> shard file, from model.safetensors.index.json or a single file."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path) -> WeightIndex:
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

    def read(self, names: dict[str, str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
                    out[param] = t.to(device) if device.type != "cpu" else t
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


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ShardMaps:
    """Copy-on-write memory maps of safetensors shards; tensors as zero-copy views into them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._maps: dict[str, tuple[mmap.mmap, dict, int]] = {}
        self._lock = threading.Lock()

    def _open(self, shard: str) -> tuple[mmap.mmap, dict, int]:
        with self._lock:
            if shard not in self._maps:
                with open(self.folder / shard, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps[shard] = (mm, header, 8 + n)
            return self._maps[shard]

    def view(self, shard: str, name: str) -> torch.Tensor:
        mm, header, start = self._open(shard)
        info = header[name]
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = (
            torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        return flat.view(info["shape"])

    def release(self, shard: str, name: str) -> None:
        """Drop the mapped pages of a tensor once copied, so they leave the process's RSS."""
        mm, header, start = self._open(shard)
        begin, end = header[name]["data_offsets"]
        lo = (start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), start + end)
        if hi > lo and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        with self._lock:
            for mm, _, _ in self._maps.values():
                mm.close()
            self._maps.clear()


class BlockBuffers:
    """Two reusable sets of block tensors; read k goes into set k % 2."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.sets: list[dict[str, torch.Tensor]] = [{}, {}]
        self.staging: list[dict[str, torch.Tensor]] = [{}, {}]  # pinned host copies on CUDA

    def _slot(self, pool: dict, name: str, shape, dtype, device, pin: bool) -> torch.Tensor:
        t = pool.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
            pool[name] = t
        return t

    def fill(self, k: int, sources: dict[str, torch.Tensor], copy_stream=None) -> dict[str, torch.Tensor]:
        """Copy {param: source view} into set k % 2 (converting float dtypes) and return it.

        Runs under inference mode (in whichever thread): the buffers are inference tensors and
        every update to them happens there.
        """
        with torch.inference_mode():
            return self._fill(k, sources, copy_stream)

    def _fill(self, k: int, sources: dict[str, torch.Tensor], copy_stream=None) -> dict[str, torch.Tensor]:
        out = {}
        on_cuda = self.device.type == "cuda"
        for param, src in sources.items():
            dtype = self.dtype if src.is_floating_point() else src.dtype
            dst = self._slot(self.sets[k % 2], param, src.shape, dtype, self.device, False)
            if on_cuda:
                host = self._slot(self.staging[k % 2], param, src.shape, dtype, torch.device("cpu"), True)
                host.copy_(src)
                with torch.cuda.stream(copy_stream):
                    dst.copy_(host, non_blocking=True)
            else:
                dst.copy_(src)
            out[param] = dst
        if on_cuda and copy_stream is not None:
            copy_stream.synchronize()
        return out


def _dtype_bytes(name: str) -> int:
    return _ST_DTYPES.get(name, torch.float32).itemsize


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


def _slice_kwargs(kwargs: dict[str, Any], start: int, stop: int, batch: int) -> dict[str, Any]:
    """_slice_batch of a call's keyword arguments."""
    return {k: _slice_batch(v, start, stop, batch) for k, v in kwargs.items()}


class _FactoriesOnMeta(TorchFunctionMode):
    """torch.empty / zeros / ones / full called without a device make meta tensors (this thread only)."""

    _FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _meta_model(cls, config, dtype: torch.dtype) -> Any:
    """cls.from_config with parameters on meta and real buffers, allocating no parameter memory.

    accelerate's init_empty_weights alone makes each parameter on the CPU and then moves it to
    meta: the C heap keeps free chunks about the size of the model between small live objects,
    and the CPU allocations of later forward passes wander into ever new parts of them, so
    RssAnon grows with every block passed. Parameters here are born on meta; should a buffer
    come from one of those factories (and so be meta), the model is built the accelerate way.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), _FactoriesOnMeta():
        model = cls.from_config(config, dtype=dtype)
    if any(b.device.type == "meta" for b in model.buffers()):
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=dtype)
    return model


class LayerwiseModel:
    """A transformers model whose decoder blocks are loaded from disk one at a time.

    With max_layer set, `model` serves forward passes that stop (StopForward) at or before
    block max_layer: later blocks, the final norm and the LM head are never read. With
    max_layer=None every block streams and the final norm and LM head are loaded too, so full
    forward passes (logits, the CE-loss score) work.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        max_layer: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        micro_batch: int = 8,
        prefetch: bool = True,
    ):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        self.folder = Path(folder)
        self.index = WeightIndex.open(self.folder)
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = max(1, micro_batch)
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        cls = AutoModelForCausalLM if any(is_causal_lm_class(a) for a in archs) else AutoModel
        self.model = _meta_model(cls, config, dtype)
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
        self.maps = ShardMaps(self.folder)
        self.buffers = BlockBuffers(self.device, dtype)
        self._reads = 0  # reads are strictly sequential: read k fills buffer set k % 2
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
            wanted = [
                n for n in group if not n.startswith(block_prefix) and (self.full or not n.startswith(SKIP_PREFIXES))
            ]
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
        views = {p: self.maps.view(self.index.weight_map[c], c) for p, c in names.items()}
        with self._lock:
            k = self._reads
            self._reads += 1
        tensors = self.buffers.fill(k, views, self._copy_stream)
        self.bytes_read += sum(v.numel() * v.element_size() for v in views.values())
        del views
        for c in names.values():
            self.maps.release(self.index.weight_map[c], c)
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
        """Make block i load its weights, run in micro-chunks, and drop its weights again.

        The block's own meta parameters are put back after each call: new meta tensors made per
        call would be small objects that live on in the C heap, carved out of the chunks the
        block's activations just freed, so the heap (and RssAnon) grew with every block passed.
        """
        original = block.forward
        owner = self
        metas = [(mod, name, p) for mod in block.modules() for name, p in mod._parameters.items() if p is not None]

        def forward(self_block, hidden_states, *args, **kwargs):
            tensors = owner._take(i)
            self_block.load_state_dict(tensors, strict=True, assign=True)
            try:
                out = owner._run_chunks(original, hidden_states, args, kwargs)
            finally:
                for mod, name, p in metas:
                    mod._parameters[name] = p
                del tensors
            trim_heap()
            return out

        block.forward = types.MethodType(forward, block)

    def _run_chunks(self, original, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        """The block's output for the batch, run in micro-chunks of micro_batch rows.

        Each chunk's hidden states go straight into one output tensor (no list of chunk outputs
        to concatenate, which held two copies at once); a tuple output keeps the first chunk's
        other elements.
        """
        batch = hidden_states.shape[0]
        out = rest = None
        for s in range(0, batch, self.micro_batch):
            e = min(s + self.micro_batch, batch)
            o = original(hidden_states[s:e], *_slice_batch(args, s, e, batch), **_slice_kwargs(kwargs, s, e, batch))
            first = o[0] if isinstance(o, tuple) else o
            if out is None:
                out = first.new_empty((batch, *first.shape[1:]))
                rest = tuple(o[1:]) if isinstance(o, tuple) else None
            out[s:e] = first
            del o, first
        assert out is not None  # batch >= 1
        return out if rest is None else (out, *rest)

    def block_bytes(self, i: int) -> int:
        return self.index.nbytes(list(self._names(self.blocks[i], f"{self.blocks_path}.{i}.").values()))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pending.clear()
        self.maps.close()


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
