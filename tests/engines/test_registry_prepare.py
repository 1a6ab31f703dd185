"""The engine registry and the validator: engines by name, one tokenization, one context check."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sluice.capabilities import Task
from sluice.config import Settings, load_settings
from sluice.errors import ConfigError, RequestRejected
from sluice.sampling import CHAT, COMPLETIONS, EMBEDDINGS
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
        self.batches: list[list[str]] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return super().encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.batches.append(list(texts))
        return super().encode_batch(texts)


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
    assert (
        request.prompt_token_ids == WordTokenizer().encode("a b c")
        and len(request.prompt_token_ids) == 3
    )
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


class EmbeddingEcho(CountingEcho):
    """CountingEcho serving the embed task."""

    def __init__(self, max_model_len: int = 64) -> None:
        super().__init__(max_model_len)
        self.task = Task.EMBED


def test_embedding_inputs_are_tokenized_in_one_call_and_checked_each() -> None:
    engine = EmbeddingEcho(max_model_len=16)
    body = {"input": ["a b", [7, 8, 9], "c"], "encoding_format": "base64"}
    request = to_gen_request(claimed(body, EMBEDDINGS), engine)
    assert engine.counting.batches == [["a b", "c"]]  # one encode_batch for the texts
    tokens = WordTokenizer().encode
    assert request.embed == [tokens("a b"), [7, 8, 9], tokens("c")]
    assert request.embed_base64 and request.sampling.max_tokens == 0
    with pytest.raises(RequestRejected) as err:
        to_gen_request(claimed({"input": ["ok", " ".join("w" * 17)]}, EMBEDDINGS), engine)
    assert err.value.code == "context_length_exceeded" and "input[1] has 17 tokens" in (
        err.value.message
    )


def test_a_worker_runs_only_its_task() -> None:
    generating, embedding = CountingEcho(), EmbeddingEcho()
    with pytest.raises(RequestRejected) as err:
        to_gen_request(claimed({"input": "x"}, EMBEDDINGS), generating)
    assert "pooling" in err.value.message
    with pytest.raises(RequestRejected) as err:
        to_gen_request(claimed({"prompt": "x", "max_tokens": 2}), embedding)
    assert "embedding model" in err.value.message


def test_echo_embeds_each_input_as_its_bag_of_tokens() -> None:
    engine = EmbeddingEcho()
    body = {"input": ["the cat", "cat the", "a dog"]}
    engine.add(to_gen_request(claimed(body, EMBEDDINGS), engine))
    (result,) = engine.step()
    vectors = json.loads(result.text)
    assert len(vectors) == 3 and all(len(v) == 16 for v in vectors)
    assert vectors[0] == vectors[1] != vectors[2]  # the same words, in any order
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-9
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (6, 0, "stop")
