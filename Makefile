# Everything a fresh machine needs, from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SLI    := $(VENV)/bin/sli
export SLI_HOME ?= $(HOME)/.cache/sli
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
DEMO_CACHE := $(SLI_HOME)/demo-cache

.PHONY: setup model demo test test-slow test-latest lock bench quality chat clean

# Exact versions: requirements.lock, as constraints for everything pip installs here, the
# isolated build of sli itself included (PIP_CONSTRAINT reaches build environments).
LOCK := $(abspath requirements.lock)

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(LOCK) $(PY) -m pip install --quiet pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls GBs of CUDA packages
	$(PY) -c "import torch" 2>/dev/null || PIP_CONSTRAINT=$(LOCK) $(PY) -m pip install --quiet torch==2.13.0
	PIP_CONSTRAINT=$(LOCK) $(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

model: setup
	$(SLI) fetch-model

demo: model
	SLI=$(SLI) bash scripts/demo.sh $(DEMO_CACHE)

test: model
	$(PY) -m pytest -q

test-slow: model
	$(PY) -m pytest -q -m slow

# The suite on the newest versions pyproject.toml allows (not the lock): drift shows up here
# before users meet it. Its own venv, so the locked one stays as tested.
LATEST := .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install --quiet "torch>=2.6,<2.14"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	diff requirements.lock $(LATEST)/versions.txt | grep '^[<>]' || true
	SLI_HOME=$(SLI_HOME) $(LATEST)/bin/python -m pytest -q

# Re-pin the lock to what the locked venv holds (after a green `make test-latest` and an upgrade).
lock: setup
	{ sed -n '1,3p' requirements.lock; { $(PY) -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; \
	  grep '^setuptools==' requirements.lock; } | sort -uf; } > requirements.lock.new  # setuptools: the build backend
	mv requirements.lock.new requirements.lock

bench: model
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(SLI) bench SmolLM2-135M-Instruct --out bench-results

quality: model
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) scripts/measure_quality.py $(SLI_HOME)/models/SmolLM2-135M-Instruct --out quality-results --max-tokens 2048

chat: model
	$(PY) scripts/chat.py SmolLM2-135M-Instruct --mode nf4 --memory-budget 96MB --dtype bfloat16

# The benchmarks' peers, each in an environment of its own under $(SLI_HOME)/peers (none is an
# sli dependency): llama.cpp built from source at the best ISA that runs here, venv-bench (the
# binding, lm-eval, AirLLM), venv-llmcompressor, the 1 B-shape model and its Q4_0. PARTS picks
# some: make peers PARTS="llama model-1b". Paths and versions: $(SLI_HOME)/peers/peers.json
.PHONY: peers
peers: model
	SLI_PYTHON=$(abspath $(PY)) bash scripts/setup_peers.sh $(PARTS)

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info .pytest_cache
