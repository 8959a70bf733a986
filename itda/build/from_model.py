"""Build dictionaries from a model end to end: corpus -> forward passes -> one builder per hookpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from itda.activations.corpus import Contexts
from itda.activations.hookpoints import Hookpoint
from itda.activations.models import LoadedModel
from itda.activations.stream import FP16_MAX, iterate_batches
from itda.build import BuildConfig, DictionaryBuilder, builder_class
from itda.dictionary import Dictionary, DictionaryMeta


@dataclass
class ModelBuildResult:
    dictionaries: dict[Hookpoint, Dictionary]
    tokens: int  # activations streamed per hookpoint
    seconds: float
    forward_seconds: float  # time inside the model's forward passes
    max_abs: dict[Hookpoint, float]  # largest activation component seen per hookpoint

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def build_from_model(
    lm: LoadedModel,
    hookpoints: list[Hookpoint],
    contexts: Contexts,
    config: BuildConfig,
    *,
    corpus_name: str = "",
    batch_contexts: int = 32,
    dtype: torch.dtype = torch.float16,
    include_special: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ModelBuildResult:
    """Stream the contexts through the model once, feeding every hookpoint's builder."""
    builders: dict[Hookpoint, DictionaryBuilder] = {}
    max_abs = {hp: 0.0 for hp in hookpoints}
    tokens = 0
    forward_s = 0.0
    t0 = time.perf_counter()
    n_real = int((~contexts.special).sum()) if not include_special else int(contexts.attention_mask.sum())
    bar = tqdm(total=n_real, unit="tok", unit_scale=True, disable=not progress, desc=f"build {lm.name}")
    batches = iterate_batches(
        lm.model, hookpoints, contexts, batch_contexts=batch_contexts, dtype=dtype, include_special=include_special, device=device
    )
    try:
        while True:
            tf = time.perf_counter()
            batch = next(batches, None)
            forward_s += time.perf_counter() - tf
            if batch is None:
                break
            for hp, acts in batch.items():
                if hp not in builders:
                    d_model = acts.unit.shape[1]
                    build = {"corpus": corpus_name, "documents_fingerprint": contexts.documents_fingerprint,
                             "stream_dtype": str(dtype).replace("torch.", ""), "include_special": include_special}
                    meta = DictionaryMeta(d=d_model, model=lm.name, hookpoint=hp.name, layer=hp.layer,
                                          tokenizer=lm.tokenizer_name, dataset_fingerprint=contexts.fingerprint, build=build)
                    builders[hp] = builder_class(config.mode)(d_model, config, meta=meta, device=device)
                builders[hp].update(acts.unit, acts.refs)
                max_abs[hp] = max(max_abs[hp], acts.max_abs)
            n_batch = next(iter(batch.values())).unit.shape[0]  # every hookpoint sees the same tokens
            tokens += n_batch
            bar.update(n_batch)
            sizes = {hp.name: b.size for hp, b in builders.items()}
            bar.set_postfix(sizes if len(sizes) <= 3 else {"atoms": sum(sizes.values())}, refresh=False)
    finally:
        bar.close()
    for hp, m in max_abs.items():
        if m > FP16_MAX and dtype == torch.float16 and progress:
            tqdm.write(f"note: {hp.name} reaches |x| = {m:,.0f}, beyond fp16; streamed as fp16 unit directions + fp32 norms, nothing lost")
    dictionaries = {hp: b.dictionary() for hp, b in builders.items()}
    return ModelBuildResult(dictionaries, tokens, time.perf_counter() - t0, forward_s, max_abs)


def save_dictionaries(result: ModelBuildResult, out_dir: Path) -> list[Path]:
    paths = []
    for hp, d in result.dictionaries.items():
        p = out_dir / f"{hp.file_stem}.safetensors"
        d.save(p)
        paths.append(p)
    return paths
