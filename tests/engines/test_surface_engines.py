"""The surface fields each cheap engine honours: echo (n, logprobs, ignore_eos) and hf."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.capabilities import CAPABILITIES
from sluice.config import load_settings
from worker.engines import load_engine
from worker.engines.base import Engine, GenRequest, GenResult, Sampling
from worker.engines.echo import EchoEngine
from worker.runner import choices_json, to_result

PROMPT = "one two three four five"


def run(engine: Engine, *requests: GenRequest) -> dict[int, GenResult]:
    for request in requests:
        engine.add(request)
    out: dict[int, GenResult] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return out
        out.update((r.id, r) for r in engine.step())
    raise AssertionError("engine did not finish")


def req(rid: int, prompt: str = PROMPT, **sampling: Any) -> GenRequest:
    return GenRequest(rid, prompt, Sampling(**sampling))


@pytest.mark.parametrize("name", ["echo", "sim"])
def test_engine_class_carries_the_table(name: str) -> None:
    engine = load_engine(load_settings(engine=name))
    assert engine.capabilities == CAPABILITIES[name]


def test_echo_n_logprobs_and_usage_over_choices() -> None:
    echo = EchoEngine(load_settings(engine="echo"))
    out = run(echo, req(1, n=3, logprobs=2, max_tokens=3), req(2, max_tokens=3))
    plain = out[2]
    assert plain.choices is None and plain.text == "one two three"
    many = out[1]
    assert many.choices is not None and len(many.choices) == 3
    assert {c.text for c in many.choices} == {"one two three"}
    assert many.completion_tokens == 9  # summed over choices, as OpenAI counts
    tokens = many.choices[0].logprobs
    assert tokens is not None
    assert [(t.token, t.logprob, t.top) for t in tokens] == [
        ("one", 0.0, [("one", 0.0)]),
        (" two", 0.0, [(" two", 0.0)]),
        (" three", 0.0, [(" three", 0.0)]),
    ]
    stored = to_result(many, 1.0)
    assert stored.completion_tokens == 9 and stored.choices_json == choices_json(many)
    assert to_result(plain, 1.0).choices_json is None


def test_echo_ignore_eos_generates_max_tokens() -> None:
    echo = EchoEngine(load_settings(engine="echo"))
    out = run(echo, req(1, "a b", max_tokens=5, ignore_eos=True), req(2, "a b", max_tokens=5))
    assert (out[1].text, out[1].finish_reason, out[1].completion_tokens) == ("a b a b a", "length",
                                                                             5)  # fmt: skip
    assert (out[2].text, out[2].finish_reason) == ("a b", "stop")


# -- hf (transformers on the tiny Llama) --------------------------------------------------


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    pytest.importorskip("torch", reason="the hf engine needs torch")
    pytest.importorskip("transformers", reason="the hf engine needs transformers")
    from sluice.tiny_model import build_tiny_model

    model: Path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    engine = load_engine(load_settings(engine="hf", model=str(model)), device="cpu")
    yield engine
    engine.close()


def test_hf_capabilities(hf: Engine) -> None:
    assert hf.capabilities == CAPABILITIES["hf"]


def test_hf_top_k_1_and_min_p_1_are_greedy(hf: Engine) -> None:
    # With sampling on, top_k=1 (or min_p=1: only tokens as likely as the best) leaves one
    # token per step: the greedy output, whatever the seed. Ignored, they would sample.
    greedy = run(hf, req(1, max_tokens=12, temperature=0.0))[1].text
    for i, extra in enumerate(({"top_k": 1}, {"min_p": 1.0})):
        for seed in (1, 2, 3):
            out = run(hf, req(10 + i, max_tokens=12, temperature=1.5, seed=seed, **extra))
            assert out[10 + i].text == greedy, (extra, seed)
    free = {run(hf, req(20 + s, max_tokens=12, temperature=1.5, seed=s))[20 + s].text
            for s in (1, 2, 3)}  # fmt: skip
    assert free != {greedy}


def test_hf_repetition_penalty_changes_greedy_output(hf: Engine) -> None:
    base = run(hf, req(1, "a a a a a a", max_tokens=16, temperature=0.0))[1]
    penalised = run(
        hf, req(2, "a a a a a a", max_tokens=16, temperature=0.0, repetition_penalty=2.0)
    )[2]
    assert penalised.text != base.text


def test_hf_n_sampled_and_greedy(hf: Engine) -> None:
    out = run(hf, req(1, max_tokens=8, temperature=1.5, seed=5, n=3),
              req(2, max_tokens=8, temperature=0.0, n=2))  # fmt: skip
    sampled, greedy = out[1].choices, out[2].choices
    assert sampled is not None and len(sampled) == 3
    assert len({c.text for c in sampled}) > 1  # three samples, not one copied
    assert out[1].completion_tokens == sum(c.completion_tokens for c in sampled)
    assert greedy is not None and len(greedy) == 2 and greedy[0].text == greedy[1].text


def test_worker_refuses_what_its_engine_cannot_honour() -> None:
    # An API configured for another engine accepted it: the worker's own check fails this
    # request alone, naming the field, rather than running it without.
    import json

    from sluice.errors import RequestRejected
    from sluice.sampling import CHAT
    from sluice.store.work import Claimed
    from worker.prepare import to_gen_request

    sim = load_engine(load_settings(engine="sim"))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    with pytest.raises(RequestRejected) as caught:
        to_gen_request(Claimed(1, "b", CHAT, 1, 1, 0, json.dumps(body), False), sim)
    assert caught.value.code == "unsupported_parameter" and "n " in caught.value.message
    echo = load_engine(load_settings(engine="echo"))
    ready = to_gen_request(Claimed(2, "b", CHAT, 1, 1, 0, json.dumps(body), False), echo)
    assert ready.sampling.n == 2


def test_hf_logprobs_greedy_picks_the_likeliest(hf: Engine) -> None:
    out = run(hf, req(1, max_tokens=6, temperature=0.0, logprobs=2),
              req(2, max_tokens=6, temperature=1.0, seed=4, n=2, logprobs=0))  # fmt: skip
    greedy = out[1].choices
    assert greedy is not None and len(greedy) == 1
    tokens = greedy[0].logprobs
    assert tokens is not None and len(tokens) == greedy[0].completion_tokens
    for token in tokens:
        assert len(token.top) == 2 and token.top[0][1] >= token.top[1][1]
        assert token.top[0] == (token.token, pytest.approx(token.logprob))
        assert token.logprob <= 0.0
    sampled = out[2].choices
    assert sampled is not None and len(sampled) == 2
    assert all(c.logprobs is not None and all(t.top == [] for t in c.logprobs) for c in sampled)
