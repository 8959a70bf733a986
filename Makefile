# Quickstart targets. Each sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itda-installed
INTEROP := $(VENV)/.itda-interop
BROWSER := $(VENV)/.itda-browser
LINT := $(VENV)/.itda-lint

.PHONY: demo test test-fast lint format reliability bench bench-sae clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot,bench,models,datasets]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itda demo

# sae-lens and eai-sparsify for the interop tests; pinned to the torch/transformers already
# installed so they never pull another torch. If they cannot be installed the tests skip.
$(INTEROP): $(STAMP)
	$(PY) -m pip freeze | grep -iE '^(torch|transformers|numpy|safetensors|accelerate)==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[interop]' || echo "interop packages could not be installed: the interop tests will be skipped"
	touch $(INTEROP)

# Debian's chromium and playwright (which drives it) for the explorer's browser tests; where
# either cannot be installed those tests skip and say why.
$(BROWSER): $(STAMP)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the browser tests will be skipped"
	$(PY) -m pip install -q -e '.[browser]' || echo "playwright could not be installed: the browser tests will be skipped"
	touch $(BROWSER)

$(LINT): $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	touch $(LINT)

# ruff (lint + format check) and pyright (basic), configured in pyproject.toml
lint: $(LINT)
	$(VENV)/bin/ruff check itda tests benchmarks
	$(VENV)/bin/ruff format --check itda tests benchmarks
	$(VENV)/bin/pyright

format: $(LINT)
	$(VENV)/bin/ruff check --fix itda tests benchmarks
	$(VENV)/bin/ruff format itda tests benchmarks

test: $(STAMP) $(INTEROP) $(BROWSER)
	$(PY) -m pytest -q

# kills and resumes (builds from files and models, SAE training), interrupts, concurrent writers,
# a read-only HOME and the bad-input table, with counts
reliability: $(STAMP)
	$(PY) -m pytest -q -s tests/test_reliability.py tests/test_build_checkpoint.py tests/test_sae_reliability.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/perf/pursuit.py
	$(PY) benchmarks/perf/build_modes.py
	$(PY) benchmarks/perf/build_pipeline.py

# the slower issue-8/9/11 benchmarks (tens of minutes on 2 cores)
bench-sae: $(STAMP)
	$(PY) benchmarks/quality/sae_init.py --steps 300 --eval-every 20
	$(PY) benchmarks/quality/layer_matching_suite.py --full --keep-grids
	$(PY) benchmarks/quality/layer_matching_suite.py --benchmarks gemma3 smollm2 --draws 3 --keep-grids --name layer_matching_suite_draws
	$(PY) benchmarks/quality/layer_matching_suite.py --benchmarks smollm2 --levels 0.2 0.3 0.4 --first-draw 3 --keep-grids --no-self --name layer_matching_suite_fresh
	$(PY) benchmarks/quality/layer_matching_suite.py --benchmarks gemma3 --first-draw 3 --keep-grids --no-self --name layer_matching_suite_fresh
	$(PY) benchmarks/quality/layer_matching_suite.py --benchmarks gemma3 smollm2 --first-draw 4 --keep-grids --name layer_matching_suite_heldout_self
	$(PY) benchmarks/quality/layer_matching_suite.py --benchmarks seeds checkpoints --seeds 7 --first-seed 4 --keep-grids --name layer_matching_suite_seeds_heldout
	$(PY) benchmarks/research/fusion_probe.py
	$(PY) benchmarks/research/norm_profile_probe.py
	$(PY) benchmarks/quality/jaccard_scale.py && $(PY) benchmarks/quality/jaccard_scale.py --model seeds --tokens 131072 --k 7 --min-cosine 0.95
	$(PY) benchmarks/perf/compare_memory.py

clean:
	rm -rf $(VENV) out
