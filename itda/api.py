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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from itda.activations.config import CorpusConfig, ModelSource
from itda.activations.models import LoadedModel, load_model
from itda.builder import BuildConfig
from itda.comparison import CompareConfig, ModelComparison
from itda.configfields import FieldError
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


def evaluate(
    coder,
    data=None,
    *,
    model: str | LoadedModel | None = None,
    k: int | None = None,
    batch_size: int = 8192,
    **options,
):
    """Reconstruction quality of a dictionary or SAE (`itda eval`, `itda sae eval`).

    data: activations (a [T, d] tensor, an iterable of batches, an activation file or a loaded one),
    read batch_size rows at a time → an EvalReport (dictionary; options: method) or SaeEvalReport (SAE).
    Without data, held-out text of the corpus through `model` (default: the one the coder records) → a
    ModelEvalReport with the CE-loss score; options: corpus, field, tokens, context, ce, method, device,
    layerwise, max_memory.
    """
    from itda.sae.io import LoadedSae

    if data is None:
        from itda.evaluation.on_model import evaluate_on_model

        return evaluate_on_model(coder, model, k=k, **options)
    batches = _batches(data, batch_size)
    if isinstance(coder, LoadedSae):
        coder = coder.sae
    if isinstance(coder, Dictionary):
        from itda.evaluation.report import evaluate as evaluate_dictionary

        return evaluate_dictionary(coder, batches, k=k, **options)
    from itda.sae.evaluate import evaluate_sae

    return evaluate_sae(coder, batches)


def _batches(data, batch_size: int = 8192) -> Iterable[torch.Tensor]:
    """Batches of activations given as a file, a loaded file (an ActivationSet), a tensor or batches."""
    from itda.activations.files import ActivationSet, load_activations

    if isinstance(data, (str, os.PathLike)):
        data = load_activations(data)
    if isinstance(data, ActivationSet):
        return (x for x, _ in data.batches(batch_size))
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
    data=None,
    *,
    latents: int,
    model: str | LoadedModel | None = None,
    layer: int | None = None,
    hookpoint: str | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    out: str | os.PathLike | None = None,
    on_model: Callable[[LoadedModel], None] | None = None,
    on_start: Callable | None = None,
    **options,
):
    """An SAE (arch topk, batchtopk or matryoshka_batchtopk) trained from any initialisation (`kaiming`,
    `data`, `itda:DICT`, ...) (`itda sae train`); returns LoadedSae(sae, meta), written to `out` when given.

    data: activations (a [T, d] tensor, batches of one, or an activation file; the last `holdout` of the
    rows are held out and evaluated into meta.train['heldout']), or None and `model` with one of `layer`
    (resid_post) and `hookpoint`: the model's activations over the corpus's training split. checkpoint:
    saved every checkpoint_every steps and on Ctrl-C, resumed when it exists, removed at the end.
    options: SaeSpec (k, arch, matryoshka_widths (a comma list or ints), init, batch_size, b_dec, fill, crop,
    centre_atoms, init_sample, holdout; batch_topk: deprecated arch batchtopk), TrainConfig (steps, lr,
    auxk_alpha, resample, seed, threshold_lr, ...), CorpusConfig (corpus, field, context, ...)
    and ModelSource fields (model_dtype, layerwise, max_memory, revision, offline). on_model(lm): once the
    model is loaded; on_start(trainer, init record): before the first step.
    """
    from itda.sae.batchgroup import training_group
    from itda.sae.run import run_training

    spec, config, corpus_opts, model_opts = _training_options(latents, options, checkpoint, checkpoint_every)
    device = choose_device(device)
    group = training_group(device)  # torchrun: every rank trains on its shards
    if data is not None:
        source = _rows_source(data, spec, config.seed, group)
        if layer is not None or hookpoint is not None:  # where the rows came from: exports name it
            source.meta.hookpoint = _recorded_hookpoint(layer, hookpoint)
    else:
        from itda.sae.run import model_source

        if model is None:
            raise ItdaInputError("give activations (data) or a model")
        corpus = CorpusConfig(**corpus_opts, tokens=config.steps * spec.batch_size)
        lm = model if isinstance(model, LoadedModel) else ModelSource(model, str(device), **model_opts)
        source = model_source(lm, corpus, spec, layer, hookpoint, on_model=on_model, group=group)
    return run_training(
        source,
        spec,
        config,
        device=device,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        out=out,
        progress=progress,
        on_start=on_start,
        group=group,
    )


def _training_options(latents: int, options: dict, checkpoint, checkpoint_every: int) -> tuple:
    """(SaeSpec, TrainConfig, corpus options, model options) from train_sae's options, each checked."""
    from itda.sae.init import parse_init
    from itda.sae.train import SaeSpec, TrainConfig

    spec_opts, train_opts, corpus_opts, model_opts = _split(options, SaeSpec, TrainConfig, CorpusConfig, ModelSource)
    spec = SaeSpec(latents, **spec_opts)
    spec.validate()
    if checkpoint is not None and checkpoint_every < 1:
        raise FieldError("checkpoint_every", "must be >= 1 with {checkpoint}", others=("checkpoint",))
    parse_init(spec.init)
    config = TrainConfig(**train_opts)
    config.validate()
    return spec, config, corpus_opts, model_opts


def train_saes(
    model: str | LoadedModel,
    layers,
    *,
    latents: int,
    out: str | os.PathLike | None = None,
    distribute_hookpoints: bool = False,
    device: str | torch.device = "auto",
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    on_model: Callable[[LoadedModel], None] | None = None,
    **options,
) -> dict:
    """One SAE per hookpoint of `layers` (a comma list or list of block indices or hookpoint names), all
    trained from one forward pass per batch (`itda sae train MODEL --layers 4,8`); returns {hookpoint:
    LoadedSae} (under torchrun: this rank's), each written to OUT/<hookpoint>.safetensors when `out` is
    given. distribute_hookpoints: under torchrun, each rank trains hookpoints i = rank mod W on the whole
    batch instead of every rank training all of them on its shard. checkpoint: a folder, one file per
    hookpoint. options: as train_sae's (SaeSpec, TrainConfig, CorpusConfig, ModelSource fields)."""
    from itda.sae.batchgroup import training_group
    from itda.sae.multi import owners, parse_hookpoints, train_hookpoints

    hps = parse_hookpoints(layers)
    spec, config, corpus_opts, model_opts = _training_options(latents, options, checkpoint, checkpoint_every)
    device = choose_device(device)
    group = training_group(device)
    owners(len(hps), group, distribute_hookpoints)  # refused before the model loads
    corpus = CorpusConfig(**corpus_opts, tokens=config.steps * spec.batch_size)
    corpus.validate()
    deepest = max(hp.layer for hp in hps)  # the model is cut after the deepest hookpoint's block
    lm = (
        model
        if isinstance(model, LoadedModel)
        else ModelSource(model, str(device), **model_opts).load(max_layer=deepest)
    )
    if on_model is not None:
        on_model(lm)
    return train_hookpoints(
        lm,
        lm.name if isinstance(model, LoadedModel) else str(model),
        corpus,
        spec,
        config,
        hps,
        out=None if out is None else Path(out),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        checkpoint_every=checkpoint_every,
        distribute=distribute_hookpoints,
        group=group,
        progress=progress,
    )


def _recorded_hookpoint(layer: int | None, hookpoint: str | None) -> str:
    """The hookpoint name activations were taken at: one of `layer` (resid_post) and `hookpoint`."""
    from itda.activations.hookpoints import parse_hookpoint
    from itda.configfields import FieldError

    if layer is not None and hookpoint is not None:
        raise FieldError("layer", "give one of {field} and {hookpoint}", others=("hookpoint",))
    return parse_hookpoint(str(layer) if layer is not None else str(hookpoint)).name


def _rows_source(data, spec, seed: int, group):
    """The TrainSource of activations given as a file, a tensor or batches."""
    from itda.sae.run import rows_source

    if isinstance(data, (str, os.PathLike)):
        from itda.activations.files import load_activations

        return rows_source(load_activations(data).acts, spec, seed, str(data), str(Path(data)), group)
    if isinstance(data, torch.Tensor):
        return rows_source(data, spec, seed, "tensor", group=group)
    rows = torch.cat([x[0] if isinstance(x, tuple) else x for x in data])
    return rows_source(rows, spec, seed, "batches", group=group)


def export(source, format: str, out: str | os.PathLike, *, k: int | None = None, signed: bool = True) -> Path:
    """Write an SAE (any architecture; BatchTopK ones as SAELens JumpReLU) or a dictionary (as a TopK SAE) as a
    SAELens or sparsify folder, or a dictionary as SAELens's matching_pursuit SAE ("saelens-mp": k MP steps
    over ±atoms when signed, else non-negative MP over the atoms); returns where."""
    from itda.sae.export_mp import export_saelens_mp
    from itda.sae.io import LoadedSae, dictionary_as_sae, export_saelens, export_sparsify, load_sae_or_none

    if format not in ("saelens", "sparsify", "saelens-mp"):
        raise ItdaInputError(f"format {format!r}: choose saelens, sparsify or saelens-mp")
    if not signed and format != "saelens-mp":
        raise ItdaInputError("signed=False (--plain) applies to --format saelens-mp only")
    name = str(source) if isinstance(source, (str, os.PathLike)) else "the source"
    if isinstance(source, (str, os.PathLike)):
        loaded = load_sae_or_none(source)
        source = loaded if loaded is not None else Dictionary.load(source)
    if format == "saelens-mp":
        if isinstance(source, LoadedSae):
            raise ItdaInputError(
                f"{name} is an SAE; saelens-mp exports a dictionary (matching pursuit over its atoms): "
                "use --format saelens"
            )
        return export_saelens_mp(source, out, k=k, signed=signed)
    if isinstance(source, LoadedSae) and k is not None:
        raise ItdaInputError(f"{name} is an SAE: its k is its own; k (--k) applies to a dictionary input only")
    loaded = source if isinstance(source, LoadedSae) else dictionary_as_sae(source, k)
    writers = {"saelens": export_saelens, "sparsify": export_sparsify}
    return writers[format](*loaded, out)


def explore_sae(
    sae,
    out: str | os.PathLike,
    *,
    model: str | LoadedModel | None = None,
    label: str | None = None,
    progress: bool = True,
    **options,
):
    """The explorer of an SAE (an itda.sae.LoadedSae, or a path `load_sae` reads) in folder out: one card
    per latent with its held-out usage by the SAE's inference rule, strongest contexts, co-occurring
    latents, activation histogram and (causal LMs) direct logit effects. options: corpus, field, tokens,
    context, contexts, device."""
    from itda.explorer.page import explorer_data, write_explorer
    from itda.explorer.run import Explorer, sae_view_on_model
    from itda.sae.io import LoadedSae, load_sae

    loaded = sae if isinstance(sae, LoadedSae) else load_sae(sae)
    view = sae_view_on_model(
        loaded,
        label=label or loaded.meta.hookpoint or "SAE",
        model=model if not isinstance(model, LoadedModel) else None,
        lm=model if isinstance(model, LoadedModel) else None,
        progress=progress,
        **options,
    )
    return Explorer(write_explorer(Path(out), explorer_data([view], None)), [view], None)


def explore(
    dictionary: Dictionary,
    out: str | os.PathLike,
    *,
    other: Dictionary | None = None,
    model: str | LoadedModel | None = None,
    model_b: str | LoadedModel | None = None,
    labels: Sequence[str] | None = None,
    progress: bool = True,
    **options,
):
    """The static atom explorer of one dictionary (or two side by side) in folder out (`itda explore`): an
    Explorer of its index.html, the views (label, summary, atom cards) and the shared atoms (None for one).

    model: the dictionary's model (default: the one it records); model_b: the other's (default: the one it
    records, else model). labels: one per dictionary (default: their hookpoints, as A: and B:).
    options: corpus, field, tokens, context, k, contexts (per atom), device.
    """
    from itda.explorer.data import shared_atoms
    from itda.explorer.page import explorer_data, write_explorer
    from itda.explorer.run import Explorer, view_on_model

    dicts = [dictionary] + ([other] if other is not None else [])
    if labels is None:
        labels = [d.meta.hookpoint or "dictionary" for d in dicts]
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"] if len(dicts) == 2 else labels
    models = [model] + ([_model_b(model, model_b, dictionary, other)] if other is not None else [])
    views = [
        view_on_model(
            d,
            label=label,
            model=m if not isinstance(m, LoadedModel) else None,
            lm=m if isinstance(m, LoadedModel) else None,
            progress=progress,
            **options,
        )
        for d, label, m in zip(dicts, labels, models, strict=True)
    ]
    shared = shared_atoms(dictionary, other) if other is not None else None
    return Explorer(write_explorer(Path(out), explorer_data(views, shared)), views, shared)


def _model_b(model, model_b, dictionary: Dictionary, other: Dictionary):
    """The second dictionary's model: model_b, else the one it records (a loaded `model` of the same name
    serves), else model."""
    if model_b is not None:
        return model_b
    if isinstance(model, LoadedModel) and other.meta.model in (None, dictionary.meta.model):
        return model
    return other.meta.model or model


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
    chosen document indices, atoms each newly covered, the coverage report and curves, and the
    chosen documents' tokens and texts.

    options: model, field, k, support_atoms, context, max_doc_tokens, device.
    """
    from itda.selection.run import choose, corpus_supports

    docs, supports = corpus_supports(corpus, dictionary, progress=progress, **options)
    sel = choose(supports, len(dictionary), budget, strategy, seed=seed)
    return sel._replace(texts=tuple(docs[int(i)] for i in sel.chosen))
