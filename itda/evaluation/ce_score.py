"""CE-loss score of a dictionary (or SAE) spliced into a causal LM (SAEBench's core metric).

score = (CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean), where CE_spliced
replaces the hookpoint's activations by their dictionary reconstruction and CE_zero_ablation
by zeros. Special tokens (BOS) keep their activations in every run; only text positions are
replaced. The loss is next-token cross entropy over positions whose target is a real token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from itda.activations.corpus import Contexts
from itda.activations.hookpoints import Hookpoint, resolve_module


@dataclass
class CEScore:
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    tokens: int

    @property
    def score(self) -> float:
        denom = self.ce_zero - self.ce_clean
        return (self.ce_zero - self.ce_spliced) / denom if denom else float("nan")


def _replace_first(obj, new):
    if isinstance(obj, tuple):
        return (new,) + tuple(obj[1:])
    return new


@contextlib.contextmanager
def patch(model: torch.nn.Module, hp: Hookpoint, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the hookpoint's tensor [batch, seq, d] by replace(tensor) during forward passes."""
    mod, want_input = resolve_module(model, hp)
    if want_input:

        def pre(m, args, kwargs):
            if args:
                return (replace(args[0]),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=replace(kwargs["hidden_states"]))
            return args, kwargs

        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(m, i, o):
            first = o[0] if isinstance(o, tuple) else o
            return _replace_first(o, replace(first))

        handle = mod.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    target_ok = mask[:, 1:] > 0
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    lp = lp.view(ids.shape[0], -1)[target_ok]
    return float(lp.sum()), int(target_ok.sum())


class Reconstructor(Protocol):
    """Anything with reconstruct(x [B, d], k) -> x_hat [B, d]: a Dictionary or an SAE."""

    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor: ...


def ce_loss_score(
    model: torch.nn.Module,
    dictionary: Reconstructor,
    hp: Hookpoint,
    contexts: Contexts,
    *,
    k: int | None = None,
    batch_contexts: int = 16,
    device: str | torch.device = "cpu",
) -> CEScore:
    from itda.activations.stream import check_contexts_fit

    check_contexts_fit(model, contexts)
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    for s in range(0, len(contexts), batch_contexts):
        e = min(s + batch_contexts, len(contexts))
        ids = contexts.input_ids[s:e].to(device)
        mask = contexts.attention_mask[s:e].to(device)
        text = ~contexts.special[s:e].to(device)

        def splice(x: torch.Tensor, text: torch.Tensor = text) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            sel = text.reshape(-1)
            out = flat.clone()
            out[sel] = dictionary.reconstruct(flat[sel].float(), k).to(x.dtype)
            return out.view_as(x)

        def zero(x: torch.Tensor, text: torch.Tensor = text) -> torch.Tensor:
            return x * (~text)[..., None].to(x.dtype)

        with torch.inference_mode():
            for name, fn in (("clean", None), ("spliced", splice), ("zero", zero)):
                ctx = patch(model, hp, fn) if fn is not None else contextlib.nullcontext()
                with ctx:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total, n = _next_token_ce(logits, ids, mask)
                sums[name] += total
            count += n
    return CEScore(sums["clean"] / count, sums["spliced"] / count, sums["zero"] / count, count)
