"""The request surface: every field, per engine, honoured (in Sampling) or refused naming it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sluice.capabilities import CAPABILITIES, OPTIONAL
from sluice.errors import InvalidInput
from sluice.sampling import CHAT, COMPLETIONS, RESPONSES, Sampling, parse_body

ENGINES = sorted(CAPABILITIES)
MSGS = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

# field -> (chat body fields using it, what the parsed Sampling must then hold)
OPTIONAL_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "n": ({"n": 3}, {"n": 3}),
    "seed": ({"seed": 7}, {"seed": 7}),
    "top_k": ({"top_k": 5}, {"top_k": 5}),
    "min_p": ({"min_p": 0.1}, {"min_p": 0.1}),
    "repetition_penalty": ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
    "presence_penalty": ({"presence_penalty": 0.5}, {"presence_penalty": 0.5}),
    "frequency_penalty": ({"frequency_penalty": -0.5}, {"frequency_penalty": -0.5}),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, {"logprobs": 2}),
    "response_format": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": SCHEMA, "strict": True},
            }
        },
        {"json_schema": json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))},
    ),
    "ignore_eos": ({"ignore_eos": True}, {"ignore_eos": True}),
}
# Fields every engine honours.
BASE_CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"max_tokens": 9}, {"max_tokens": 9}),
    ({"max_completion_tokens": 11}, {"max_tokens": 11}),
    ({"temperature": 0.0}, {"temperature": 0.0}),
    ({"top_p": 0.5}, {"top_p": 0.5}),
    ({"stop": ["x", "y"]}, {"stop": ("x", "y")}),
    ({"user": "u-1"}, {}),
    ({"metadata": {"k": "v"}}, {}),
]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSGS, **fields}


def refused(endpoint: str, body: dict[str, Any], engine: str | None = None) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_body(endpoint, body, engine=engine)
    return caught.value


def test_the_optional_cases_cover_every_optional_field() -> None:
    assert set(OPTIONAL_CASES) == OPTIONAL


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("field", sorted(OPTIONAL_CASES))
def test_optional_field_is_honoured_or_refused_by_name(engine: str, field: str) -> None:
    fields, expected = OPTIONAL_CASES[field]
    if field in CAPABILITIES[engine]:
        sampling = parse_body(CHAT, chat(**fields), engine=engine).sampling
        for name, value in expected.items():
            assert getattr(sampling, name) == value, name
    else:
        exc = refused(CHAT, chat(**fields), engine)
        assert exc.param == field and exc.code == "unsupported_parameter"
        assert engine in exc.message


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", range(len(BASE_CASES)))
def test_base_fields_are_honoured_by_every_engine(engine: str, case: int) -> None:
    fields, expected = BASE_CASES[case]
    sampling = parse_body(CHAT, chat(**fields), engine=engine).sampling
    for name, value in expected.items():
        assert getattr(sampling, name) == value


@pytest.mark.parametrize("engine", ENGINES)
def test_neutral_values_are_accepted_by_every_engine(engine: str) -> None:
    neutral = {"n": 1, "top_k": -1, "min_p": 0, "repetition_penalty": 1, "presence_penalty": 0,
               "frequency_penalty": 0, "logprobs": False, "ignore_eos": False,
               "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}  # fmt: skip
    assert parse_body(CHAT, chat(**neutral), engine=engine).sampling == Sampling()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"service_tier": "flex"}, "service_tier"),
    ],
)
def test_fields_no_engine_honours_are_refused(fields: dict[str, Any], param: str) -> None:
    exc = refused(CHAT, chat(**fields), "vllm")
    assert exc.param == param and exc.code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": "x"}, "repetition_penalty"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b",
                                                                    "schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
         "response_format.json_schema.schema"),
        ({"user": 5}, "user"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"temprature": 0.5}, "temprature"),
    ],
)  # fmt: skip
def test_bad_values_name_the_field(fields: dict[str, Any], param: str) -> None:
    exc = refused(CHAT, chat(**fields), "vllm")
    assert exc.param == param, exc.message


def test_completions_logprobs_is_an_integer() -> None:
    body = {"model": "m", "prompt": "p", "logprobs": 3}
    assert parse_body(COMPLETIONS, body, engine="vllm").sampling.logprobs == 3
    assert parse_body(COMPLETIONS, {**body, "logprobs": 0}).sampling.logprobs == 0
    assert refused(COMPLETIONS, {**body, "logprobs": 6}).param == "logprobs"
    assert refused(COMPLETIONS, {**body, "logprobs": True}).param == "logprobs"
    assert refused(COMPLETIONS, body, "sim").code == "unsupported_parameter"
    # top_logprobs is chat's name: unknown to completions.
    assert refused(COMPLETIONS, {**body, "top_logprobs": 2}).code == "unknown_parameter"
    assert refused(COMPLETIONS, {**body, "echo": True}).param == "echo"


def test_json_object_sets_the_flag() -> None:
    fields = {"response_format": {"type": "json_object"}}
    assert parse_body(CHAT, chat(**fields), engine="vllm").sampling.json_object
    assert refused(CHAT, chat(**fields), "echo").param == "response_format"


def test_responses_body_runs_as_chat() -> None:
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        "max_output_tokens": 12,
        "text": {"format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}},
    }
    parsed = parse_body(RESPONSES, body, engine="vllm")
    assert parsed.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert parsed.sampling.max_tokens == 12 and parsed.sampling.json_schema is not None
    simple = parse_body(RESPONSES, {"model": "m", "input": "hello"}, engine="echo")
    assert simple.messages == [{"role": "user", "content": "hello"}]
    # Errors name the responses field, not the chat one it maps to.
    assert refused(RESPONSES, {**body, "max_output_tokens": 0}).param == "max_output_tokens"
    assert refused(RESPONSES, body, "echo").param == "text.format"
    assert refused(RESPONSES, {"model": "m"}).param == "input"
    assert refused(RESPONSES, {**body, "previous_response_id": "r"}).param == (
        "previous_response_id"
    )
    assert refused(RESPONSES, {**body, "n": 2}).code == "unknown_parameter"


def test_responses_logprobs_come_through_include_or_top_logprobs() -> None:
    base = {"model": "m", "input": "hi"}
    asked = {**base, "include": ["message.output_text.logprobs"], "top_logprobs": 3}
    assert parse_body(RESPONSES, asked, engine="vllm").sampling.logprobs == 3  # 3 rivals
    assert parse_body(RESPONSES, {**base, "top_logprobs": 0}, engine="hf").sampling.logprobs == 0
    assert parse_body(RESPONSES, base, engine="vllm").sampling.logprobs is None
    # Other include items, bad values, and engines without logprobs: a 400 naming the field.
    other = refused(RESPONSES, {**base, "include": ["reasoning.encrypted_content"]})
    assert (other.param, other.code) == ("include", "unsupported_parameter")
    assert refused(RESPONSES, {**base, "include": "x"}).param == "include"
    assert refused(RESPONSES, {**base, "top_logprobs": 21}).param == "top_logprobs"
    assert refused(RESPONSES, asked, "sim").param == "include"


def test_stream_only_where_allowed() -> None:
    assert refused(CHAT, chat(stream=True)).param == "stream"
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    assert parse_body(CHAT, chat(**opts), allow_stream=True).sampling == Sampling()


def test_logprobs_are_not_streamed() -> None:
    fields = {"stream": True, "logprobs": True}
    with pytest.raises(InvalidInput) as caught:
        parse_body(CHAT, chat(**fields), allow_stream=True, engine="vllm")
    assert caught.value.param == "logprobs"
