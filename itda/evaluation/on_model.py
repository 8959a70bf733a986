"""Evaluate a coder (a dictionary or an SAE, see itda.evaluation.coder) on a model's held-out activations:
reconstruction metrics and CE-loss score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from itda.activations.config import CorpusConfig
from itda.activations.corpus import Contexts, load_contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import LoadedModel, model_at_hookpoint
from itda.activations.stream import iterate_batches
from itda.errors import ItdaInputError
from itda.evaluation.ce_score import CEScore, ce_loss_score
from itda.evaluation.coder import as_coder
from itda.evaluation.report import EvalReport


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


def evaluate_on_model(
    dictionary,
    model: str | LoadedModel | None = None,
    *,
    corpus: str = CorpusConfig.corpus,
    field: str = CorpusConfig.field,
    tokens: int = 16_384,
    context: int = CorpusConfig.context,
    ce: bool = True,
    k: int | None = None,
    method: str = "mp",
    batch_contexts: int = 32,
    device: str | torch.device = "auto",
    layerwise: bool | None = False,
    max_memory: int | None = None,
) -> ModelEvalReport:
    """Held-out metrics of a Dictionary, an itda.sae.LoadedSae or any ModelCoder on a model (a name or
    path, a LoadedModel, or None: the one the coder records)."""
    loaded, name = (model, None) if isinstance(model, LoadedModel) else (None, model)
    lm, hp = model_at_hookpoint(
        dictionary,
        name,
        needs="evaluation on a model",
        device=device,
        layerwise=layerwise,
        max_memory=max_memory,
        lm=loaded,
    )
    device = lm.device
    _docs, contexts = load_contexts(
        corpus,
        lm.tokenizer,
        tokenizer_name=lm.tokenizer_name,
        split="heldout",
        tokens=tokens,
        context=context,
        field=field,
    )
    return evaluate_contexts(
        lm, dictionary, hp, contexts, ce=ce, k=k, method=method, batch_contexts=batch_contexts, device=device
    )


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
    device: str | torch.device | None = None,
) -> ModelEvalReport:
    """Reconstruction metrics over the contexts' activations at hp, and the CE-loss score for causal LMs.
    `dictionary`: a Dictionary (encoded with k atoms by `method`), an itda.sae.LoadedSae or any ModelCoder."""
    device = lm.device if device is None else device
    coder = as_coder(dictionary, k, method)
    ev = coder.evaluator()
    for batch in iterate_batches(
        lm.model,
        [hp],
        contexts,
        batch_contexts=batch_contexts,
        dtype=torch.float32,
        include_special=coder.include_special,
        device=device,
    ):
        acts = batch[hp]
        if acts.unit.shape[1] != coder.d:
            raise ItdaInputError(
                f"dimension mismatch: {hp.name} of {lm.name} has d={acts.unit.shape[1]}, the {coder.what} d={coder.d}"
            )
        ev.update(acts.dense())
    ce_result = None
    if ce and lm.is_causal:
        ce_result = ce_loss_score(lm.model, coder, hp, contexts, k=k, device=device)
    return ModelEvalReport(ev.report(), ce_result, lm.name, hp.name)
