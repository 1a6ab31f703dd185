"""/v1/embeddings: which task serves which endpoint, the body's checks, the stored vectors."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest

from sluice.capabilities import TASKS, Task
from sluice.config import load_settings
from sluice.embeddings import MAX_INPUTS, EmbedInput, embedding_body, stored_vectors
from sluice.errors import ConfigError, InvalidInput
from sluice.sampling import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, check_endpoint, parse_body


def refused(body: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as err:
        parse_body(EMBEDDINGS, body)
    return err.value


def test_each_task_serves_its_endpoints_and_refuses_the_others_saying_why() -> None:
    for endpoint in (CHAT, COMPLETIONS, RESPONSES):
        assert check_endpoint(endpoint, Task.GENERATE, "url") == endpoint
        with pytest.raises(InvalidInput) as err:
            check_endpoint(endpoint, Task.EMBED, "url")
        assert err.value.param == "url" and "embedding model" in err.value.message
        assert EMBEDDINGS in err.value.message  # what it does serve
    assert check_endpoint(EMBEDDINGS, Task.EMBED, "url") == EMBEDDINGS
    with pytest.raises(InvalidInput) as err:
        check_endpoint(EMBEDDINGS, Task.GENERATE, "endpoint", code="invalid_value")
    assert (err.value.param, err.value.code) == ("endpoint", "invalid_value")
    assert "pooling" in err.value.message and CHAT in err.value.message
    with pytest.raises(InvalidInput) as err:
        check_endpoint("/v1/audio", Task.EMBED, "url")
    assert err.value.message == f"url must be one of {EMBEDDINGS}"


def test_only_engines_that_pool_take_the_embed_task() -> None:
    assert {name for name, served in TASKS.items() if Task.EMBED in served} == {"echo", "vllm"}
    assert load_settings(engine="echo", task="embed").task == Task.EMBED
    with pytest.raises(ConfigError) as err:
        load_settings(engine="sim", task="embed")
    assert "SLUICE_TASK=embed" in str(err.value) and "sim engine serves generate" in str(err.value)


def test_every_input_form_openai_accepts() -> None:
    def inputs(value: Any) -> tuple[Any, ...]:
        parsed = parse_body(EMBEDDINGS, {"model": "m", "input": value})
        assert parsed.embed is not None and parsed.prompt is None and parsed.messages is None
        return parsed.embed.inputs

    assert inputs("a text") == ("a text",)
    assert inputs(["one", "two"]) == ("one", "two")
    assert inputs([5, 6, 7]) == ((5, 6, 7),)
    assert inputs([[1, 2], [3]]) == ((1, 2), (3,))
    assert inputs(["mixed", [4, 2]]) == ("mixed", (4, 2))


def test_encoding_format_user_and_model_are_the_only_fields() -> None:
    base = {"model": "m", "input": "x"}
    assert parse_body(EMBEDDINGS, {**base, "encoding_format": "base64"}).embed == EmbedInput(
        ("x",), base64=True
    )
    assert parse_body(EMBEDDINGS, {**base, "encoding_format": "float", "user": "u"}).embed == (
        EmbedInput(("x",), base64=False)
    )
    assert refused({**base, "encoding_format": "binary"}).param == "encoding_format"
    dims = refused({**base, "dimensions": 8})
    assert (dims.param, dims.code) == ("dimensions", "unsupported_parameter")
    unknown = refused({**base, "temperature": 0.5})
    assert (unknown.param, unknown.code) == ("temperature", "unknown_parameter")
    assert refused({**base, "stream": True}).param == "stream"
    assert refused({**base, "user": 5}).param == "user"


@pytest.mark.parametrize(
    ("value", "param"),
    [
        (None, "input"),
        ("", "input[0]"),
        ([], "input"),
        (["ok", ""], "input[1]"),
        (["ok", [1, -2]], "input[1]"),
        (["ok", [True]], "input[1]"),
        ([1.5], "input[0]"),
        ({"text": "x"}, "input"),
        (["x"] * (MAX_INPUTS + 1), "input"),
    ],
)
def test_bad_input_is_refused_naming_the_item(value: Any, param: str) -> None:
    body = {"model": "m"} if value is None else {"model": "m", "input": value}
    assert refused(body).param == param


def test_vectors_are_stored_as_the_response_carries_them() -> None:
    vectors = [[0.5, -0.25, 1.0], [0.125, 0.0, -1.5]]
    floats = stored_vectors(vectors, as_base64=False)
    assert json.loads(floats) == vectors
    packed = json.loads(stored_vectors(vectors, as_base64=True))
    # base64 is little-endian float32, as OpenAI sends it and its client decodes it.
    decoded = [list(struct.unpack("<3f", base64.b64decode(item))) for item in packed]
    assert decoded == vectors
    row = {"output_text": floats, "prompt_tokens": 7, "model": "m"}
    body = embedding_body(row)
    assert body["object"] == "list" and body["model"] == "m"
    assert [(d["object"], d["index"], d["embedding"]) for d in body["data"]] == [
        ("embedding", 0, vectors[0]),
        ("embedding", 1, vectors[1]),
    ]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
