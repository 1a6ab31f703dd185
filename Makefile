# Sluice: the one list of commands. `make help` lists them.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# vLLM release the vllm engine is type-checked against (pyproject's extra: >=0.20,<0.27).
VLLM_VERSION ?= 0.26.0
# PyTorch comes from the wheel on this machine's disk; the [hf] extra pins torch<=2.13.0
# so pip keeps it instead of fetching a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

# The install is redone only when pyproject.toml's content changes (the stamp names its hash).
PYPROJECT_HASH := $(shell (sha256sum pyproject.toml 2>/dev/null || shasum -a 256 pyproject.toml) | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)

.DEFAULT_GOAL := help
.PHONY: help venv test lint typecheck demo bench-ingest bench-feed bench-e2e bench-scale vllm-check gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

venv: $(STAMP)  ## create .venv and install Sluice with the hf and dev extras (idempotent)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'torch==$(TORCH_VERSION)'
	$(PY) -m pip install --quiet -e '.[hf,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv  ## lint, format check, type check, then the test suite
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: venv  ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv  ## mypy --strict on sluice, api, worker
	$(PY) -m mypy

demo: venv  ## run the end-to-end demo on this machine
	$(PY) -m sluice.demo

bench-ingest: venv  ## benchmark: JSONL upload into the database
	$(PY) bench/ingest.py

bench-feed: venv  ## benchmark: continuous vs fixed-batch feeding of the engine
	$(PY) bench/feed.py

bench-e2e: venv  ## benchmark: requests/s end to end through api, Redis and worker
	$(PY) bench/e2e.py

bench-scale: venv  ## benchmark: one worker vs two on one queue (sim engines)
	$(PY) bench/scale.py

vllm-check: venv  ## type-check the vllm engine against the pinned vLLM (no GPU needed)
	@# --no-deps: only vLLM's own typed sources are needed, not its CUDA stack.
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm') != '$(VLLM_VERSION)')" 2>/dev/null \
		|| $(PY) -m pip install --quiet --no-deps 'vllm==$(VLLM_VERSION)'
	$(PY) -m mypy worker/engines/vllm_engine.py scripts/gpu-check

gpu-check:  ## on a GPU host with `pip install -e '.[vllm]'`: raw vLLM vs Sluice (scripts/gpu-check)
	@# No `venv` dependency: that installs CPU torch 2.13, and vLLM pins its own torch.
	$(PY) scripts/gpu-check $(GPU_CHECK_ARGS)

clean:  ## remove caches and build output (keeps .venv and .sluice data)
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache bench/out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
