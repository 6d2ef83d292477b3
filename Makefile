# Everything a fresh machine needs, from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SLI    := $(VENV)/bin/sli
export SLI_HOME ?= $(HOME)/.cache/sli
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
DEMO_CACHE := $(SLI_HOME)/demo-cache

.PHONY: setup model demo test test-slow bench quality chat clean

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
	$(SLI) quantize SmolLM2-135M-Instruct --mode int4 --group-size 32 --cache $(DEMO_CACHE) --validate-memory
	$(SLI) inspect $(DEMO_CACHE) --verify
	$(SLI) generate $(DEMO_CACHE) --mode int4 --group-size 32 --dtype bfloat16 --memory-budget 64MB --max-new-tokens 32 \
		--prompt "Question: What is the capital of France? Answer:"

test: model
	$(PY) -m pytest -q

test-slow: model
	$(PY) -m pytest -q -m slow

bench: model
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(SLI) bench SmolLM2-135M-Instruct --out bench-results

quality: model
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) scripts/measure_quality.py $(SLI_HOME)/models/SmolLM2-135M-Instruct --out quality-results --max-tokens 2048

chat: model
	$(PY) scripts/chat.py SmolLM2-135M-Instruct --mode nf4 --memory-budget 96MB --dtype bfloat16

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
