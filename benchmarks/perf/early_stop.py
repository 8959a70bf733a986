"""Builder scoring with and without early stopping, on real activations (issue 20, 2026-12-02).

smollm2-135m, --layers of the default corpus's train split (--tokens), read once into memory; then
for each setting of BuildConfig.early_stop a fresh DictionaryBuilder per layer takes the same
batches (`itda build`'s) and the builder time (all `update` calls) is summed. Reports both times, their
ratio, the share of MP steps the stopped rows skip, and whether the dictionaries are bit-identical.
Usage: python benchmarks/perf/early_stop.py [--tokens 16384] [--layers 3 10 20 28]
"""

from __future__ import annotations

import argparse
import time

import torch

import itda.api as api
import itda.builder.builder as builder_module
from itda.builder import BuildConfig, DictionaryBuilder
from itda.pursuit import matching_pursuit


def layer_batches(tokens: int, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Per layer, the batches `itda build` feeds its builders (its default batch size)."""
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    original = DictionaryBuilder.update

    def record(self, acts, refs=None, **kw):
        seen[int(self.meta.layer)].append(acts.clone())
        return original(self, acts, refs, **kw)

    builder_module.DictionaryBuilder.update = record  # type: ignore[method-assign]
    try:
        api.build("smollm2-135m", layers=layers, tokens=tokens, progress=False)
    finally:
        builder_module.DictionaryBuilder.update = original  # type: ignore[method-assign]
    return seen


def timed_build(batches: list[torch.Tensor], early: bool) -> tuple[float, torch.Tensor]:
    b = DictionaryBuilder(batches[0].shape[1], BuildConfig.choose(early_stop=early))
    t0 = time.perf_counter()
    for x in batches:
        b.update(x)
    return time.perf_counter() - t0, b.dictionary().atoms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 10, 20, 28])
    args = ap.parse_args()
    per_layer = layer_batches(args.tokens, args.layers)
    total = {True: 0.0, False: 0.0}
    for layer, batches in per_layer.items():
        times, atoms = {}, {}
        for early in (False, True):
            times[early], atoms[early] = timed_build(batches, early)
            total[early] += times[early]
        same = torch.equal(atoms[True], atoms[False])
        x = torch.cat(batches)
        cos = BuildConfig.choose().cosine_threshold(x.shape[1]) + builder_module.STOP_MARGIN
        codes = matching_pursuit(x, atoms[True], 40, stop_cosine=cos)
        skipped = float((codes.indices < 0).float().mean())
        print(
            f"layer {layer}: {len(atoms[True])} atoms, full {times[False]:.2f} s, early stop {times[True]:.2f} s "
            f"({times[False] / times[True]:.2f}x), steps skipped against the final dictionary {skipped:.0%}, "
            f"identical: {same}"
        )
    print(f"all layers: full {total[False]:.1f} s, early stop {total[True]:.1f} s ({total[False] / total[True]:.2f}x)")


if __name__ == "__main__":
    main()
