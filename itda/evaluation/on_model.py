"""Evaluate a dictionary on a model's held-out activations: reconstruction metrics and CE-loss score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from itda.activations.corpus import Contexts, load_contexts
from itda.activations.hookpoints import Hookpoint, parse_hookpoint
from itda.activations.models import LoadedModel, load_model, same_tokenizer
from itda.activations.stream import iterate_batches
from itda.evaluation.ce_score import CEScore, ce_loss_score
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError
from itda.evaluation import EvalReport, Evaluator


@dataclass
class ModelEvalReport:
    recon: EvalReport  # or itda.sae.SaeEvalReport
    ce: CEScore | None
    model: str
    hookpoint: str

    def summary(self) -> dict:
        out = {"model": self.model, "hookpoint": self.hookpoint, **self.recon.summary()}
        if self.ce is not None:
            out.update({**asdict(self.ce), "ce_loss_score": self.ce.score})
            out["ce_tokens"] = out.pop("tokens")
            out["tokens"] = self.recon.tokens
        return out


def _coder_facts(coder) -> tuple[str | None, str | None, bool, str]:
    """(hookpoint, tokenizer, include_special, what) of a Dictionary or an SAE (itda.sae)."""
    if isinstance(coder, Dictionary):
        m = coder.meta
        return m.hookpoint, m.tokenizer, bool(m.build.get("include_special", False)), "dictionary"
    m = coder.meta
    return m.hookpoint, m.tokenizer, bool(m.include_special), "SAE"


def model_at_hookpoint(coder, model: str | None = None, *, needs: str = "this", device: str | torch.device = "cpu",
                       layerwise: bool | None = False, max_memory: int | None = None,
                       lm: LoadedModel | None = None) -> tuple[LoadedModel, Hookpoint]:
    """The model a Dictionary (or itda.sae.LoadedSae) was built on (`model` overrides the recorded
    one; `lm` is used when already loaded) and its hookpoint, refused in one line when the coder
    records no hookpoint or model, or the model's tokenizer differs from the coder's."""
    hookpoint, tokenizer, _special, what = _coder_facts(coder)
    if not hookpoint:
        raise ItdaInputError(f"the {what} records no hookpoint (built from an activation file); {needs} needs the "
                             "model and hookpoint it was built at")
    model = model or coder.meta.model
    if lm is None:
        if not model:
            raise ItdaInputError(f"the {what} records no model; give --model")
        lm = load_model(model, device=device, layerwise=layerwise, max_memory=max_memory)
    if tokenizer and not same_tokenizer(tokenizer, lm.tokenizer_name):
        raise ItdaInputError(f"tokenizer mismatch: {what} built with {tokenizer}, model has {lm.tokenizer_name}")
    return lm, parse_hookpoint(hookpoint)


def evaluate_on_model(
    dictionary,
    model: str,
    *,
    corpus: str = "default",
    field: str = "text",
    tokens: int = 16_384,
    context: int = 128,
    ce: bool = True,
    k: int | None = None,
    method: str = "mp",
    batch_contexts: int = 32,
    device: str | torch.device = "cpu",
    layerwise: bool | None = False,
    max_memory: int | None = None,
) -> ModelEvalReport:
    """Held-out metrics of a Dictionary, or of an SAE given as itda.sae.LoadedSae, on a model."""
    lm, hp = model_at_hookpoint(dictionary, model, needs="evaluation on a model",
                                device=device, layerwise=layerwise, max_memory=max_memory)
    _docs, contexts = load_contexts(corpus, lm.tokenizer, tokenizer_name=lm.tokenizer_name, split="heldout",
                                    tokens=tokens, context=context, field=field)
    return evaluate_contexts(lm, dictionary, hp, contexts, ce=ce, k=k, method=method, batch_contexts=batch_contexts,
                             device=device)


def evaluate_contexts(
    lm: LoadedModel,
    dictionary,
    hp: Hookpoint,
    contexts: Contexts,
    *,
    ce: bool = True,
    k: int | None = None,
    method: str = "mp",
    batch_contexts: int = 32,
    device: str | torch.device = "cpu",
) -> ModelEvalReport:
    """Reconstruction metrics over the contexts' activations at hp, and the CE-loss score for causal LMs."""
    _hp, _tok, include_special, what = _coder_facts(dictionary)
    if isinstance(dictionary, Dictionary):
        ev, coder, d = Evaluator(dictionary, k, method), dictionary, dictionary.d
    else:
        from itda.sae.evaluate import SaeEvaluator

        ev, coder, d = SaeEvaluator(dictionary.sae), dictionary.sae, dictionary.sae.cfg.d_in
    for batch in iterate_batches(lm.model, [hp], contexts, batch_contexts=batch_contexts, dtype=torch.float32,
                                 include_special=include_special, device=device):
        acts = batch[hp]
        if acts.unit.shape[1] != d:
            raise ItdaInputError(f"dimension mismatch: {hp.name} of {lm.name} has d={acts.unit.shape[1]}, the {what} d={d}")
        ev.update(acts.dense())
    ce_result = None
    if ce and lm.is_causal:
        ce_result = ce_loss_score(lm.model, coder, hp, contexts, k=k, device=device)
    return ModelEvalReport(ev.report(), ce_result, lm.name, hp.name)
