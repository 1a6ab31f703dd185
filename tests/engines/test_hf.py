"""HF engine on the tiny Llama, on CPU: batching, chat template, stops, context checks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the hf engine needs torch (pip install '.[hf]')")
pytest.importorskip("transformers", reason="the hf engine needs transformers (pip install '.[hf]')")

from sluice.config import load_settings
from sluice.errors import RequestRejected
from sluice.sampling import COMPLETIONS
from sluice.store.work import Claimed
from sluice.tiny_model import build_tiny_model
from worker.engines import load_engine
from worker.engines.base import GenRequest, GenResult, Sampling
from worker.engines.hf import HFEngine
from worker.prepare import to_gen_request

PROMPTS = [
    "The cat sees the dog.",
    "Where is the river today? It is near the old stone house.",
    "Hi",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[HFEngine]:
    settings = load_settings(engine="hf", model=str(tiny_model), max_num_seqs=4)
    loaded = load_engine(settings, device="cpu")
    assert isinstance(loaded, HFEngine)
    yield loaded
    loaded.close()


def greedy(max_tokens: int = 10, **extra: Any) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0, **extra)


def run(engine: HFEngine, *requests: GenRequest) -> list[GenResult]:
    for request in requests:
        engine.add(request)
    out: list[GenResult] = []
    while engine.has_unfinished():
        out.extend(engine.step())
    return out


def test_tiny_model_loads_with_auto_classes_offline(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    # vLLM's CPU attention needs head_dim 64 (it rejects 16); still a few MB.
    assert model.config.head_dim == 64
    assert (tiny_model / "model.safetensors").stat().st_size < 4_000_000
    assert tokenizer.decode(tokenizer.encode("Hello world 42", add_special_tokens=False)) == (
        "Hello world 42"
    )


def test_tiny_model_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (again / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_max_model_len_is_capped_by_the_model(engine: HFEngine) -> None:
    assert engine.max_model_len == 512  # settings say 8192; the model has 512 positions
    assert engine.slots == 4


def test_chat_template_is_applied_with_one_bos(engine: HFEngine) -> None:
    tok = engine.tokenizer
    rendered = tok.render_chat([{"role": "user", "content": "Hello, what is the city?"}])
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = engine.hf_tokenizer.encode(rendered, add_special_tokens=False)
    assert tok.encode(rendered) == ids and ids.count(ids[0]) == 1
    # Plain text gets the BOS the model expects.
    assert tok.encode("Hi") == engine.hf_tokenizer.encode("Hi")


def test_batched_greedy_matches_one_by_one(engine: HFEngine) -> None:
    prompts = [*PROMPTS, engine.tokenizer.render_chat([{"role": "user", "content": "Why?"}])]
    batch = run(engine, *(GenRequest(i, p, greedy()) for i, p in enumerate(prompts)))
    assert [r.id for r in batch] == [0, 1, 2, 3]
    singles = [run(engine, GenRequest(i, p, greedy()))[0] for i, p in enumerate(prompts)]
    # Left padding must not change what any row generates.
    assert [r.text for r in batch] == [r.text for r in singles]
    for res in batch:
        assert res.error is None and res.text
        assert res.prompt_tokens == len(engine.tokenizer.encode(prompts[res.id]))
        assert 1 <= res.completion_tokens <= 10
        assert res.finish_reason == ("length" if res.completion_tokens == 10 else "stop")


def test_one_generate_per_sampling_group_interactive_first(engine: HFEngine) -> None:
    engine.add(GenRequest(1, PROMPTS[0], greedy(4)))
    engine.add(GenRequest(2, PROMPTS[1], greedy(6)))
    engine.add(GenRequest(3, PROMPTS[2], greedy(4)))
    engine.add(GenRequest(4, PROMPTS[0], greedy(6), priority=0))
    assert sorted(r.id for r in engine.step()) == [2, 4]  # the interactive one's group
    assert sorted(r.id for r in engine.step()) == [1, 3]
    assert not engine.has_unfinished()


def test_stop_string_cuts_and_finishes_with_stop(engine: HFEngine) -> None:
    (full,) = run(engine, GenRequest(1, PROMPTS[0], greedy(12)))
    # A word the model produces after its first token, with more text after it.
    words = [w for w in full.text.split() if w.isalnum() and full.text.index(w) > 0]
    stop = next(w for w in words if full.text.index(w) + len(w) + 4 < len(full.text))
    (cut,) = run(engine, GenRequest(2, PROMPTS[0], greedy(12, stop=(stop,))))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_seeded_sampling_repeats(engine: HFEngine) -> None:
    sampling = Sampling(max_tokens=8, temperature=0.9, top_p=0.95, seed=123)
    first = run(engine, GenRequest(1, PROMPTS[1], sampling))[0]
    second = run(engine, GenRequest(2, PROMPTS[1], sampling))[0]
    assert first.text == second.text and first.error is None


def test_too_long_prompt_is_rejected_by_the_validator_alone(engine: HFEngine) -> None:
    long_prompt = " ".join(["river stone tree"] * 300)
    assert len(engine.tokenizer.encode(long_prompt)) > engine.max_model_len
    bodies = [{"prompt": long_prompt, "max_tokens": 4}, {"prompt": PROMPTS[0], "max_tokens": 4}]
    rows = [
        Claimed(i, "b", COMPLETIONS, 1, 1, 0, json.dumps(b), False) for i, b in enumerate(bodies)
    ]
    with pytest.raises(RequestRejected) as err:
        to_gen_request(rows[0], engine)
    assert err.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in err.value.message
    (result,) = run(engine, to_gen_request(rows[1], engine))
    assert result.error is None and result.completion_tokens >= 1


def test_abort_of_a_waiting_request(engine: HFEngine) -> None:
    engine.add(GenRequest(1, PROMPTS[0], greedy(4)))
    engine.add(GenRequest(2, PROMPTS[1], greedy(4)))
    engine.abort([2])
    results = {r.id: r for r in engine.step()}
    assert results[2].finish_reason == "abort"
    assert results[1].finish_reason in ("stop", "length")
    assert not engine.has_unfinished()


def test_a_streaming_request_gets_its_text_as_one_delta(engine: HFEngine) -> None:
    ids = engine.tokenizer.encode("hello world")
    streamed = GenRequest(1, "hello world", greedy(6), prompt_token_ids=ids, stream=True)
    plain = GenRequest(2, "hello world", greedy(6), prompt_token_ids=ids)
    results = {r.id: r for r in run(engine, streamed, plain)}
    deltas = engine.take_deltas()
    # generate() runs to the end in one call: the whole text comes as one piece.
    assert [(d.id, d.text) for d in deltas] == [(1, results[1].text)]
    assert results[1].text == results[2].text
