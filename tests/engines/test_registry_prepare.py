"""The engine registry and the validator: engines by name, one tokenization, one context check."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sluice.config import Settings, load_settings
from sluice.errors import ConfigError, RequestRejected
from sluice.sampling import CHAT, COMPLETIONS
from sluice.store.work import Claimed
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.engines.echo import EchoEngine
from worker.engines.registry import BUILTIN, engine_class, engine_names
from worker.engines.sim import SimEngine, SimSettings
from worker.engines.text import WordTokenizer
from worker.prepare import rejected_result, to_gen_request


class CountingTokenizer(WordTokenizer):
    """The echo engine's tokenizer, counting its calls."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)


class CountingEcho(EchoEngine):
    """Echo whose tokenizer counts, and whose add() records what it was handed."""

    def __init__(self, max_model_len: int = 64) -> None:
        super().__init__(load_settings(engine="echo", max_model_len=max_model_len))
        self.counting = CountingTokenizer()

    @property
    def tokenizer(self) -> CountingTokenizer:
        return self.counting


def claimed(body: dict[str, Any], endpoint: str = COMPLETIONS, rid: int = 1) -> Claimed:
    return Claimed(rid, "batch_x", endpoint, 1, 1, 0, json.dumps(body), False)


def test_every_builtin_engine_is_registered_and_importable_by_name() -> None:
    assert {"echo", "sim", "hf", "vllm"} <= set(engine_names())
    for name in ("echo", "sim"):  # hf and vllm import torch / vLLM: covered by their suites
        cls = engine_class(name)
        assert issubclass(cls, Engine) and cls.name == name
    assert all(":" in target for target in BUILTIN.values())


def test_unknown_engine_fails_at_settings_with_the_registered_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(engine="vlm")
    message = str(err.value)
    assert "SLUICE_ENGINE" in message and "unknown engine 'vlm'" in message
    for name in ("echo", "hf", "sim", "vllm"):
        assert name in message


def test_load_engine_builds_the_named_engine() -> None:
    engine = load_engine(load_settings(engine="echo", max_num_seqs=3))
    assert isinstance(engine, EchoEngine) and engine.slots == 3


def test_each_engine_reads_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sim's timing is the sim's: SLUICE_SIM_* reach it through its SimSettings, keywords
    # to load_engine win, and Sluice's shared Settings know nothing of them.
    monkeypatch.setenv("SLUICE_SIM_DECODE_STEP", "0.25")
    engine = load_engine(load_settings(engine="sim"), sim_decode_per_seq=0.5)
    assert isinstance(engine, SimEngine) and engine.settings_class is SimSettings
    assert (engine._decode_step, engine._decode_per_seq) == (0.25, 0.5)
    assert "sim_decode_step" not in Settings.model_fields
    with pytest.raises(ConfigError, match="unknown settings: sim_decode_step"):
        load_settings(sim_decode_step=0.1)


def test_an_engines_bad_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SIM_DECODE_STEP", "-1")
    with pytest.raises(ConfigError, match="SLUICE_SIM_DECODE_STEP: Input should be greater"):
        load_engine(load_settings(engine="sim"))
    with pytest.raises(ConfigError, match="SLUICE_SIM_DECODE_STEPS: Extra inputs"):
        load_engine(load_settings(engine="sim"), sim_decode_steps=0.1)  # a typo
    # Another engine's variables are none of the echo engine's business.
    assert isinstance(load_engine(load_settings(engine="echo")), EchoEngine)


def test_registry_module_imports_no_engine() -> None:
    # sluice.config imports the registry to check SLUICE_ENGINE; that must stay cheap.
    code = (
        "import sys; from sluice.config import load_settings; load_settings(engine='echo'); "
        "print(sorted(m for m in sys.modules if m.startswith('worker.engines.') or m in "
        "('torch', 'vllm', 'transformers')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['worker.engines.base', 'worker.engines.registry']"


def test_prompt_is_tokenized_once_and_the_ids_reach_the_engine() -> None:
    engine = CountingEcho()
    request = to_gen_request(claimed({"prompt": "a b c", "max_tokens": 4}), engine)
    assert engine.counting.encoded == ["a b c"]
    assert request.prompt_token_ids == [0, 0, 0]
    engine.add(request)
    (result,) = engine.step()
    # The engine used the ids it was handed, not a second encoding.
    assert engine.counting.encoded == ["a b c"]
    assert result.prompt_tokens == 3 and result.text == "a b c"


def test_chat_is_rendered_with_the_engines_template_then_tokenized_once() -> None:
    engine = CountingEcho()
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}
    request = to_gen_request(claimed(body, CHAT), engine)
    assert request.prompt == "<|user|>\nhi there\n<|assistant|>\n"
    assert engine.counting.encoded == [request.prompt]
    assert request.prompt_token_ids is not None and len(request.prompt_token_ids) == 4


def test_context_is_checked_once_before_the_engine() -> None:
    engine = CountingEcho(max_model_len=20)
    fits = to_gen_request(claimed({"prompt": " ".join(["w"] * 10), "max_tokens": 10}), engine)
    assert fits.prompt_token_ids is not None and len(fits.prompt_token_ids) == 10
    with pytest.raises(RequestRejected) as err:
        to_gen_request(claimed({"prompt": " ".join(["w"] * 10), "max_tokens": 11}), engine)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 20 tokens" in err.value.message
    assert "(10 in the prompt, 11 in the completion)" in err.value.message
    failed = rejected_result(7, err.value)
    assert (failed.id, failed.status, failed.error_code) == (7, "failed", "context_length_exceeded")


def test_a_prompt_with_no_tokens_is_rejected_before_the_engine() -> None:
    engine = CountingEcho()
    with pytest.raises(RequestRejected) as err:
        to_gen_request(claimed({"prompt": "", "max_tokens": 4}), engine)
    assert err.value.code == "invalid_prompt" and "no tokens" in err.value.message
    assert not engine.has_unfinished()
