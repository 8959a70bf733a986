"""Probe: in which phase `itda compare` peaks, and how long the parts beyond the forward passes take
(issue 20, 2026-12-02).

smollm2-135m against its noisy copy (`harness.suite.noisy_copy`, level 0.1), the default measures, as
benchmarks/perf/compare_memory.py runs it, in this process: RssAnon sampled every 20 ms and attributed
to the pipeline phase running (first_pass, the kept-rows measures, second_pass, ...); with --profile,
cProfile's cumulative top list instead (the builders' MP, leave-one-out, SVCCA, minibatch CKA).
The RESULTS.md phase and profile figures at 8,000 tokens are this probe.
Usage: python benchmarks/research/compare_phases.py [--tokens 8000] [--batch-tokens 4096] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the harness package
from harness.suite import noisy_copy

import itda.comparison.passes as passes
import itda.comparison.pipeline as pipeline
from itda.activations.models import load_model
from itda.comparison import CompareConfig

PHASES = [(passes, "kept_row_matrices")] + [
    (pipeline, n) for n in ("first_pass", "second_pass", "take_dictionaries", "assemble_matrices")
]


def rss_anon_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def label_phases(current: list[str]) -> None:
    """Wrap each phase function so that `current[0]` names the one running."""
    for module, name in PHASES:
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            before, current[0] = current[0], _name
            try:
                return _original(*args, **kwargs)
            finally:
                current[0] = before

        setattr(module, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    copy = noisy_copy(lm, 0.1)
    config = CompareConfig(tokens=args.tokens, batch_tokens=args.batch_tokens)
    current, peaks = ["other"], {}

    def sample() -> None:
        while True:
            peaks[current[0]] = max(peaks.get(current[0], 0.0), rss_anon_gib())
            time.sleep(0.02)

    label_phases(current)
    threading.Thread(target=sample, daemon=True).start()
    profile = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profile:
        profile.enable()
    pipeline.compare_on_corpus(lm, copy, config=config, progress=False)
    if profile:
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    print(f"{time.perf_counter() - t0:.0f} s; VmHWM {int(hwm.split()[1]) / 2**20:.2f} GiB; peak RssAnon GiB by phase:")
    print({k: round(v, 2) for k, v in peaks.items()})


if __name__ == "__main__":
    main()
