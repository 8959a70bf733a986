"""Hookpoints: names for places in a transformer, resolved to modules and captured by hooks.

Names (L = block index from 0):
  resid_post L   output of block L      = HF hidden_states[L+1] = TransformerLens blocks.L.hook_resid_post
  resid_pre L    input of block L       = HF hidden_states[L]   = blocks.L.hook_resid_pre
  attn_out L     attention sublayer output of block L (before the residual add) = blocks.L.hook_attn_out
  mlp_out L      MLP sublayer output of block L (before the residual add)       = blocks.L.hook_mlp_out
  any module path, e.g. model.layers.12.mlp (its output; first element of a tuple)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from itda.errors import ItdaInputError

KINDS = ("resid_post", "resid_pre", "attn_out", "mlp_out")
_TL = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre|attn_out|mlp_out)$")
_SHORT = re.compile(r"^(resid_post|resid_pre|attn_out|mlp_out)[ ._:]?(\d+)$")

# where decoder blocks live, and their attention / MLP submodules, per architecture family
_BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "encoder.layer",
    "bert.encoder.layer",
    "gpt_neox.layers",
    "layers",
)
_ATTN_NAMES = ("self_attn", "attn", "attention.output.dense", "attention")
_MLP_NAMES = ("mlp", "output.dense", "feed_forward")


@dataclass(frozen=True)
class Hookpoint:
    kind: str  # one of KINDS or "module"
    layer: int  # block index (-1 for a raw module path that is not inside a block)
    module: str = ""  # raw module path for kind == "module"

    @property
    def name(self) -> str:
        return self.module if self.kind == "module" else f"{self.kind}.{self.layer}"

    @property
    def file_stem(self) -> str:
        return self.name.replace("/", "_")


def parse_hookpoint(text: str, default_kind: str = "resid_post") -> Hookpoint:
    """Parse '15', 'resid_post 15', 'resid_post.15', 'blocks.15.hook_resid_post' or a module path."""
    text = text.strip()
    if text.isdigit():
        return Hookpoint(default_kind, int(text))
    m = _TL.match(text) or _SHORT.match(text)
    if m:
        a, b = m.groups()
        kind, layer = (b, int(a)) if a.isdigit() else (a, int(b))
        return Hookpoint(kind, layer)
    if re.fullmatch(r"[A-Za-z_][\w.]*", text):
        nums = [int(p) for p in text.split(".") if p.isdigit()]
        return Hookpoint("module", nums[0] if nums else -1, text)
    raise ItdaInputError(
        f"cannot parse hookpoint '{text}' (try 'resid_post 15', 'blocks.15.hook_resid_post' or a module path)"
    )


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for path in _BLOCK_PATHS:
        mod = _get(model, path)
        if isinstance(mod, torch.nn.ModuleList):
            return path, mod
    raise ItdaInputError(f"cannot find the transformer blocks of {type(model).__name__}; use a module path hookpoint")


def n_layers(model: torch.nn.Module) -> int:
    return len(find_blocks(model)[1])


def resolve_module(model: torch.nn.Module, hp: Hookpoint) -> tuple[torch.nn.Module, bool]:
    """Module to hook and whether to capture its input (True) or its output (False)."""
    if hp.kind == "module":
        mod = _get(model, hp.module)
        if mod is None:
            raise ItdaInputError(f"module '{hp.module}' not found in {type(model).__name__}")
        return mod, False
    path, blocks = find_blocks(model)
    if not 0 <= hp.layer < len(blocks):
        raise ItdaInputError(
            f"layer {hp.layer} out of range: the model has {len(blocks)} blocks (0..{len(blocks) - 1})"
        )
    block = blocks[hp.layer]
    if hp.kind == "resid_post":
        return block, False
    if hp.kind == "resid_pre":
        return block, True
    names = _ATTN_NAMES if hp.kind == "attn_out" else _MLP_NAMES
    for name in names:
        sub = _get(block, name)
        if sub is not None:
            return sub, False
    raise ItdaInputError(f"cannot find the {hp.kind} submodule in block {hp.layer} ({type(block).__name__})")


def depth(model: torch.nn.Module, hp: Hookpoint) -> int:
    """Index of the last block the hookpoint needs (for stopping the forward pass early)."""
    if hp.kind == "module":
        path, _ = find_blocks(model)
        if hp.module.startswith(path + "."):
            return int(hp.module[len(path) + 1 :].split(".")[0])
        return 1 << 30
    return hp.layer


class StopForward(Exception):
    """Raised by a hook once every requested hookpoint is captured."""


def _first(t) -> torch.Tensor:
    """The hidden states a hook sees: a module's output (or input), or the first of a tuple of them."""
    return t[0] if isinstance(t, (tuple, list)) else t


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, hookpoints: list[Hookpoint], stop_early: bool = True
) -> Iterator[dict[Hookpoint, torch.Tensor]]:
    """Register hooks filling a dict hookpoint -> activation [batch, seq, d] on each forward.

    With stop_early, the forward pass is cut (StopForward) after the deepest block needed;
    callers run the model inside `with contextlib.suppress(StopForward)`.
    """
    store: dict[Hookpoint, torch.Tensor] = {}
    handles = []

    def put(hp: Hookpoint, t: torch.Tensor) -> None:
        # a module run in micro-chunks (layer-wise execution) fires once per chunk: concatenate
        store[hp] = torch.cat([store[hp], t]) if hp in store else t

    blocks = None
    try:
        _, blocks = find_blocks(model)
    except ItdaInputError:
        stop_early = False
    for hp in hookpoints:
        mod, want_input = resolve_module(model, hp)
        if want_input:
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, args, kwargs, hp=hp: put(hp, _first(args) if args else kwargs["hidden_states"]),
                    with_kwargs=True,
                )
            )
        else:
            handles.append(mod.register_forward_hook(lambda m, i, o, hp=hp: put(hp, _first(o))))
    if stop_early and blocks is not None:
        deepest = max(depth(model, hp) for hp in hookpoints)
        if deepest < len(blocks):

            def stop(m, i, o):
                if all(hp in store for hp in hookpoints):
                    raise StopForward

            handles.append(blocks[deepest].register_forward_hook(stop))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
