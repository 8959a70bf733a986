"""Shared code of the benchmark scripts (benchmarks/perf, quality and research).

    harness.results      OUT (benchmarks/out), best_of, machine, write_result, run_measured
    harness.seed_models  the small GPT-2 seeds: train_tokenizer, train_model, model_dir, bench_dir
    harness.suite        the layer-matching suite's models, samples, grids, hits and plots

Every script puts benchmarks/ on sys.path itself, so it runs as `python benchmarks/<group>/<script>.py`
from the repository root (or from anywhere else); no script imports another script.
"""
