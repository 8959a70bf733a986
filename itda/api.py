"""The Python API in a few names: `import itda`, then itda.build, itda.compare, itda.evaluate, ...

Each function takes what the matching command takes (the same config dataclasses, or their
fields as keywords) and returns a typed result; none prints, and progress bars are tqdm.auto
(notebook widgets in Jupyter). Models are given by packaged name, path, .gguf file or Hugging Face
hub ID, or as an already loaded `LoadedModel` (itda.load_model) to reuse it across calls. device
'auto' (the default) is CUDA when available, else CPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from itda.activations.config import CorpusConfig
from itda.activations.models import LoadedModel, load_model
from itda.builder import BuildConfig
from itda.comparison import CompareConfig, ModelComparison
from itda.devices import choose_device
from itda.dictionary import Dictionary
from itda.errors import ItdaInputError

__all__ = ["build", "compare", "evaluate", "explore", "export", "load_model", "select", "train_sae"]


def _model(model: str | LoadedModel, device: str | torch.device = "auto") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device=device)


def _split(options: dict, *configs: type) -> list[dict]:
    """options divided by the config class whose field each names; an unknown name is refused."""
    parts: list[dict] = [{} for _ in configs]
    for key, value in options.items():
        owner = next((i for i, c in enumerate(configs) if key in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None:
            raise ItdaInputError(f"unknown option {key!r}")
        parts[owner][key] = value
    return parts


def build(
    model: str | LoadedModel,
    *,
    layers: Iterable[int] = (),
    hookpoints: Iterable[str] = (),
    hook: str = "resid_post",
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    **options,
) -> dict[str, Dictionary]:
    """Dictionaries keyed by hookpoint name, built in one pass over the corpus (`itda build MODEL`).

    options: any field of CorpusConfig (corpus, tokens, context, ...) or BuildConfig (k,
    min_cosine, threshold, mode, ...); the dictionaries record the corpus they were built on.
    """
    from itda.activations.hookpoints import parse_hookpoint
    from itda.builder.from_model import build_on_corpus

    corpus_opts, build_opts = _split(options, CorpusConfig, BuildConfig)
    corpus = CorpusConfig(**corpus_opts)
    config = BuildConfig.choose(build_opts.pop("threshold", None), build_opts.pop("min_cosine", None), **build_opts)
    hps = [parse_hookpoint(str(layer), default_kind=hook) for layer in layers] + [
        parse_hookpoint(h) for h in hookpoints
    ]
    if not hps:
        raise ItdaInputError("give at least one layer or hookpoint")
    lm = _model(model, device)
    result = build_on_corpus(
        lm,
        hps,
        corpus,
        config,
        device=lm.device,
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    return {hp.name: d for hp, d in result.dictionaries.items()}


def evaluate(coder, data=None, *, model: str | LoadedModel | None = None, k: int | None = None, **options):
    """Reconstruction quality of a dictionary or SAE (`itda eval`, `itda sae eval`).

    data: activations (a [T, d] tensor, an iterable of batches, or an activation file) → an
    EvalReport (dictionary) or SaeEvalReport (SAE). Without data, held-out text of the corpus
    through `model` (default: the one the coder records) → an OnModelReport with the CE-loss
    score; options: corpus, field, tokens, context, ce, device, ...
    """
    from itda.sae.io import LoadedSae

    if data is None:
        from itda.evaluation.on_model import evaluate_on_model

        return evaluate_on_model(coder, model, k=k, **options)
    batches = _batches(data)
    if isinstance(coder, LoadedSae):
        coder = coder.sae
    if isinstance(coder, Dictionary):
        from itda.evaluation.report import evaluate as evaluate_dictionary

        return evaluate_dictionary(coder, batches, k=k, **options)
    from itda.sae.evaluate import evaluate_sae

    return evaluate_sae(coder, batches)


def _batches(data, batch_size: int = 8192) -> Iterable[torch.Tensor]:
    if isinstance(data, (str, os.PathLike)):
        from itda.activations.files import load_activations

        return (x for x, _ in load_activations(data).batches(batch_size))
    if isinstance(data, torch.Tensor):
        return data.split(batch_size)
    return data


def compare(
    model_a: str | LoadedModel,
    model_b: str | LoadedModel | None = None,
    *,
    corpus: str = "default",
    field: str = "text",
    device: str | torch.device = "auto",
    progress: bool = True,
    config: CompareConfig | None = None,
    **options,
) -> ModelComparison:
    """Two models layer by layer (`itda compare A B`): per-measure [L_A, L_B] matrices with
    .summary(measure) (correspondence, argmax accuracy), .save(dir) and .plot(measure).

    model_b None (or model_a itself) compares the model with itself. options: CompareConfig
    fields (tokens, measures, k, min_cosine, cka_memory, ...). The default corpus's held-out
    split is read; another corpus is read whole.
    """
    from itda.comparison import compare_on_corpus
    from itda.comparison.registry import expand_measures

    if config is None:
        if "measures" in options:
            options["measures"] = expand_measures(list(options["measures"]))
        config = CompareConfig(**options)
    lm_a = _model(model_a, device)
    lm_b = None if model_b is None or model_b is model_a or model_b == model_a else _model(model_b, device)
    return compare_on_corpus(lm_a, lm_b, corpus, field, config, progress=progress)


def train_sae(
    data,
    *,
    latents: int,
    k: int = 32,
    init: str = "kaiming",
    steps: int = 1000,
    batch_size: int = 4096,
    device: str | torch.device = "auto",
    progress: bool = True,
    seed: int = 0,
    **options,
):
    """A TopK SAE trained on activations (a [T, d] tensor, batches of one, or an activation file), from any
    initialisation (`kaiming`, `data`, `itda:DICT`, ...); returns LoadedSae(sae, meta).

    options: TrainConfig fields (lr, auxk_alpha, resample, ...) and b_dec, fill, crop, batch_topk.
    """
    from itda.sae.init import new_sae
    from itda.sae.io import LoadedSae, SaeMeta
    from itda.sae.model import SaeConfig
    from itda.sae.train import SaeTrainer, TrainConfig, shuffled_batches

    init_opts = {key: options.pop(key) for key in ("b_dec", "fill", "crop") if key in options}
    batch_topk = bool(options.pop("batch_topk", False))
    rows = torch.cat([x[0] if isinstance(x, tuple) else x for x in _batches(data)]).to(torch.float32)
    config = TrainConfig(steps=steps, seed=seed, **options)
    config.validate()
    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:16_384]]
    sae, info = new_sae(
        SaeConfig(rows.shape[1], latents, k, batch_topk),
        init,
        sample,
        device=choose_device(device),
        seed=seed,
        **init_opts,
    )
    trainer = SaeTrainer(sae, config)
    trainer.fit(shuffled_batches(rows, batch_size, seed), progress=progress)
    meta = SaeMeta(
        init=info,
        train={
            **dataclasses.asdict(config),
            "lr": trainer.lr,
            "batch_size": batch_size,
            "tokens": trainer.tokens_seen,
            "final_train_fvu": trainer.last_fvu,
        },
    )
    return LoadedSae(trainer.sae, meta)


def export(source, format: str, out: str | os.PathLike, *, k: int | None = None) -> Path:
    """Write an SAE or a dictionary (as a TopK SAE) as a SAELens or sparsify folder; returns where."""
    from itda.sae.io import LoadedSae, dictionary_as_sae, export_saelens, export_sparsify, load_sae_or_none

    if isinstance(source, (str, os.PathLike)):
        loaded = load_sae_or_none(source)
        source = loaded if loaded is not None else Dictionary.load(source)
    loaded = source if isinstance(source, LoadedSae) else dictionary_as_sae(source, k)
    writers = {"saelens": export_saelens, "sparsify": export_sparsify}
    if format not in writers:
        raise ItdaInputError(f"format {format!r}: choose saelens or sparsify")
    return writers[format](*loaded, out)


def explore(
    dictionary: Dictionary,
    out: str | os.PathLike,
    *,
    other: Dictionary | None = None,
    model: str | LoadedModel | None = None,
    progress: bool = True,
    **options,
) -> Path:
    """The static atom explorer of one dictionary (or two side by side) in folder out; returns its index.html.

    options: corpus, tokens, context, k, contexts (per atom), device.
    """
    from itda.explorer.data import shared_atoms
    from itda.explorer.page import explorer_data, write_explorer
    from itda.explorer.run import view_on_model

    lm = model if isinstance(model, LoadedModel) else None
    name = model if isinstance(model, str) else None
    dicts = [dictionary] + ([other] if other is not None else [])
    labels = [d.meta.hookpoint or "dictionary" for d in dicts]
    if len(dicts) == 2:
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    views = [
        view_on_model(d, label=label, model=name, lm=lm, progress=progress, **options)
        for d, label in zip(dicts, labels, strict=True)
    ]
    shared = shared_atoms(dictionary, other) if other is not None else None
    return write_explorer(Path(out), explorer_data(views, shared))


def select(
    corpus: str,
    dictionary: Dictionary,
    budget: int,
    *,
    strategy: str = "greedy",
    seed: int = 0,
    progress: bool = True,
    **options,
):
    """The `budget` documents of corpus that cover the most atoms (`itda select`): a Selection of
    chosen document indices, atoms each newly covered, the coverage report and curves.

    options: model, field, k, support_atoms, context, max_doc_tokens, device.
    """
    from itda.selection.run import choose, corpus_supports

    _docs, supports = corpus_supports(corpus, dictionary, progress=progress, **options)
    return choose(supports, len(dictionary), budget, strategy, seed=seed)
