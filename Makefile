# Quickstart targets. Each sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itda-installed
INTEROP := $(VENV)/.itda-interop
BROWSER := $(VENV)/.itda-browser

.PHONY: demo test test-fast reliability bench bench-sae clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot,bench,models]'
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

test: $(STAMP) $(INTEROP) $(BROWSER)
	$(PY) -m pytest -q

# kills and resumes (builds from files and models, SAE training), interrupts, concurrent writers,
# a read-only HOME and the bad-input table, with counts
reliability: $(STAMP)
	$(PY) -m pytest -q -s tests/test_reliability.py tests/test_build_checkpoint.py tests/test_sae_reliability.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	cd benchmarks && ../$(PY) pursuit.py
	cd benchmarks && ../$(PY) build_modes.py
	cd benchmarks && ../$(PY) build_pipeline.py

# the slower issue-8/9/11 benchmarks (tens of minutes on 2 cores)
bench-sae: $(STAMP)
	cd benchmarks && ../$(PY) sae_init.py --steps 300 --eval-every 20
	cd benchmarks && ../$(PY) layer_matching_suite.py --full --keep-grids
	cd benchmarks && ../$(PY) layer_matching_suite.py --benchmarks gemma3 smollm2 --draws 3 --keep-grids --name layer_matching_suite_draws
	cd benchmarks && ../$(PY) layer_matching_suite.py --benchmarks smollm2 --levels 0.2 0.3 0.4 --first-draw 3 --keep-grids --no-self --name layer_matching_suite_fresh
	cd benchmarks && ../$(PY) layer_matching_suite.py --benchmarks gemma3 --first-draw 3 --keep-grids --no-self --name layer_matching_suite_fresh
	cd benchmarks && ../$(PY) layer_matching_suite.py --benchmarks gemma3 smollm2 --first-draw 4 --keep-grids --name layer_matching_suite_heldout_self
	cd benchmarks && ../$(PY) layer_matching_suite.py --benchmarks seeds checkpoints --seeds 7 --first-seed 4 --keep-grids --name layer_matching_suite_seeds_heldout
	cd benchmarks && ../$(PY) fusion_probe.py
	cd benchmarks && ../$(PY) norm_profile_probe.py
	cd benchmarks && ../$(PY) jaccard_scale.py && ../$(PY) jaccard_scale.py --model seeds --tokens 131072 --k 7 --min-cosine 0.95
	cd benchmarks && ../$(PY) compare_memory.py

clean:
	rm -rf $(VENV) out
