# Everything a fresh machine needs, from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SLI    := $(VENV)/bin/sli
export SLI_HOME ?= $(HOME)/.cache/sli
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
DEMO_CACHE := $(SLI_HOME)/demo-cache

.PHONY: setup model demo test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls GBs of CUDA packages
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

model: setup
	$(SLI) fetch-model

demo: model
	$(SLI) quantize SmolLM2-135M-Instruct --mode nf4 --cache $(DEMO_CACHE) --validate-memory
	$(SLI) inspect $(DEMO_CACHE) --verify
	$(SLI) generate $(DEMO_CACHE) --mode nf4 --memory-budget 200MB --max-new-tokens 32 \
		--prompt "Question: What is the capital of France? Answer:"

test: model
	$(PY) -m pytest -q

test-slow: model
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
