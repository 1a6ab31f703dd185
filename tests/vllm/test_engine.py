"""Sluice's VLLMEngine on real vLLM, in this process: vLLM's own refusals, abort, failure, close."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sluice.sampling import Sampling
from tests.vllm.conftest import tiny_engine
from worker.engines.base import GenRequest, GenResult

if TYPE_CHECKING:
    from worker.engines.vllm_engine import VLLMEngine


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[VLLMEngine]:
    loaded = tiny_engine(tiny_model)
    yield loaded
    loaded.close()


def drain(engine: VLLMEngine, timeout: float = 60) -> dict[int, GenResult]:
    out: dict[int, GenResult] = {}
    deadline = time.monotonic() + timeout
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "the engine did not finish"
        out.update((r.id, r) for r in engine.step())
    return out


def request(engine: VLLMEngine, rid: int, prompt: str, **sampling: Any) -> GenRequest:
    ids = engine.tokenizer.encode(prompt)
    return GenRequest(rid, prompt, Sampling(**sampling), prompt_token_ids=ids)


def test_settings_reach_vllm(engine: VLLMEngine) -> None:
    from worker.engines.vllm_engine import default_max_num_batched_tokens

    config = engine._engine.vllm_config
    assert config.scheduler_config.policy == "priority"
    assert config.scheduler_config.max_num_seqs == 2
    assert engine.max_model_len == 512 and engine.slots == 2
    # Sluice sets the token budget itself: LLM's default, not LLMEngine's smaller one.
    assert config.scheduler_config.max_num_batched_tokens == default_max_num_batched_tokens()
    assert default_max_num_batched_tokens() == 4096  # vLLM's LLM default on a CPU


def test_vllms_own_settings_come_from_sluice_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine owns these (VLLMSettings): SLUICE_ variables, checked against vLLM's lists.
    from sluice.errors import ConfigError
    from worker.engines.vllm_engine import VLLMEngine, VLLMSettings

    assert VLLMEngine.settings_class is VLLMSettings
    monkeypatch.setenv("SLUICE_QUANTIZATION", "")  # empty: the checkpoint decides
    monkeypatch.setenv("SLUICE_GPU_MEMORY_UTILIZATION", "0.3")
    own = VLLMSettings.load()
    assert own.quantization is None and own.gpu_memory_utilization == 0.3
    monkeypatch.setenv("SLUICE_DTYPE", "float42")
    with pytest.raises(ConfigError, match="SLUICE_DTYPE: Value error, 'float42' is not one of"):
        VLLMSettings.load()
    monkeypatch.setenv("SLUICE_DTYPE", "float32")
    monkeypatch.setenv("SLUICE_KV_CACHE_DTYPE", "int3")
    with pytest.raises(ConfigError, match="SLUICE_KV_CACHE_DTYPE"):
        VLLMSettings.load()


def test_tokenizer_matches_vllms_own_and_keeps_one_bos(engine: VLLMEngine) -> None:
    tok = engine.tokenizer
    own = engine._engine.get_tokenizer()
    assert tok.encode("The cat sees the dog.") == own.encode("The cat sees the dog.")
    chat = tok.render_chat([{"role": "user", "content": "hello"}])
    ids = tok.encode(chat)
    assert ids == own.encode(chat, add_special_tokens=False)
    assert ids.count(ids[0]) == 1


def test_a_request_vllm_refuses_fails_alone(engine: VLLMEngine) -> None:
    # Past the validator (a direct add): vLLM's VLLMValidationError is this request's error.
    too_long = GenRequest(1, "x", Sampling(max_tokens=4), prompt_token_ids=[7] * 600)
    engine.add(too_long)
    engine.add(request(engine, 2, "The cat sees the dog.", max_tokens=4, temperature=0))
    results = drain(engine)
    assert results[1].finish_reason == "error"
    assert "maximum model length of 512" in str(results[1].error)
    assert results[2].error is None and results[2].completion_tokens == 4


def test_abort_in_the_engine(engine: VLLMEngine) -> None:
    engine.add(request(engine, 1, "Hi", max_tokens=400, ignore_eos=True))
    engine.add(request(engine, 2, "Hi", max_tokens=3, ignore_eos=True))
    engine.step()
    engine.abort([1])
    results = drain(engine)
    assert results[1].finish_reason == "abort"
    assert results[2].completion_tokens == 3
    assert not engine._engine.has_unfinished_requests()


def test_engine_core_death_propagates_and_close_kills_every_process(
    engine: VLLMEngine,
) -> None:
    procs = engine.processes
    assert procs, "vLLM's engine core runs in child processes"
    engine.add(request(engine, 1, "Hi", max_tokens=400, ignore_eos=True))
    engine.step()
    core = next(p for p in procs if p.ppid() == os.getpid())
    os.kill(core.pid, signal.SIGKILL)  # the engine core dies mid-run
    deadline = time.monotonic() + 60
    with pytest.raises(Exception) as err:
        while time.monotonic() < deadline:
            engine.step()
    assert "EngineDead" in type(err.value).__name__ or "died" in str(err.value).lower()
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 15
    assert not [p for p in procs if p.is_running() and p.status() != "zombie"]
