"""n, logprobs and /v1/responses through a real stack (echo), read with openai's own types."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.e2e.conftest import Running, start_stack

MODEL = "sluice-echo"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    for running in start_stack(backend, Path(tmp_path_factory.mktemp(f"surface-{backend}"))):
        running.http.headers.update(running.stack.auth_headers)  # the local admin key
        yield running


def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


def outputs(sluice: Running, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
    batch = sluice.run_file(lines, endpoint)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"]["failed"] == 0, sluice.lines(batch["error_file_id"])
    return {x["custom_id"]: x["response"]["body"] for x in sluice.lines(batch["output_file_id"])}


def test_chat_n_and_logprobs(sluice: Running) -> None:
    msgs = [{"role": "user", "content": "alpha beta gamma"}]
    out = outputs(sluice, [
        line("n2", CHAT, {"messages": msgs, "n": 2, "max_completion_tokens": 2}),
        line("lp", CHAT, {"messages": msgs, "logprobs": True, "top_logprobs": 1,
                          "max_tokens": 50}),
        line("plain", CHAT, {"messages": msgs, "max_tokens": 50}),
    ], CHAT)  # fmt: skip
    n2 = ChatCompletion.model_validate(out["n2"])
    assert [c.index for c in n2.choices] == [0, 1]
    assert n2.choices[0].message.content == n2.choices[1].message.content == "<|user|> alpha"
    assert n2.usage is not None and n2.usage.completion_tokens == 4  # 2 choices x 2 tokens
    lp = ChatCompletion.model_validate(out["lp"])
    assert lp.choices[0].logprobs is not None and lp.choices[0].logprobs.content is not None
    content = lp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    assert all(t.logprob == 0.0 and [a.token for a in t.top_logprobs] == [t.token]
               for t in content)  # fmt: skip
    assert ChatCompletion.model_validate(out["plain"]).choices[0].logprobs is None


def test_completions_logprobs_shape(sluice: Running) -> None:
    url = "/v1/completions"
    out = outputs(sluice, [line("c", url, {"prompt": "x y z", "logprobs": 1, "n": 2})], url)
    done = Completion.model_validate(out["c"])
    assert len(done.choices) == 2
    logprobs = done.choices[1].logprobs
    assert logprobs is not None and logprobs.tokens == ["x", " y", " z"]
    assert logprobs.text_offset == [0, 1, 3] and logprobs.token_logprobs == [0.0, 0.0, 0.0]
    assert logprobs.top_logprobs == [{"x": 0.0}, {" y": 0.0}, {" z": 0.0}]


def test_responses_endpoint_in_a_batch_file(sluice: Running) -> None:
    url = "/v1/responses"
    out = outputs(sluice, [
        line("s", url, {"input": "red green blue", "instructions": "be brief"}),
        line("cut", url, {"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "red green blue"}]}], "max_output_tokens": 2}),
    ], url)  # fmt: skip
    done = Response.model_validate(out["s"])
    assert done.status == "completed"
    assert done.output_text == "<|system|> be brief <|user|> red green blue <|assistant|>"
    assert done.usage is not None and done.usage.output_tokens > 0
    cut = Response.model_validate(out["cut"])
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "<|user|> red"


def test_responses_logprobs_in_a_batch_file(sluice: Running) -> None:
    url = "/v1/responses"
    body = {"input": "red green", "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    out = outputs(sluice, [line("lp", url, body), line("plain", url, {"input": "red"})], url)
    done = Response.model_validate(out["lp"])
    part = done.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert [t.token for t in part.logprobs] == ["<|user|>", " red", " green", " <|assistant|>"]
    assert all(t.logprob == 0.0 and len(t.top_logprobs) == 1 for t in part.logprobs)
    assert "logprobs" not in out["plain"]["output"][0]["content"][0]  # only when asked


def test_online_chat_n_logprobs_and_refusals_with_the_openai_client(sluice: Running) -> None:
    key = (sluice.stack.auth_headers.get("Authorization") or "Bearer sk-local").split()[-1]
    client = OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=key, max_retries=0)
    msgs: Any = [{"role": "user", "content": "one two"}]
    done = client.chat.completions.create(
        model=MODEL, messages=msgs, n=2, logprobs=True, top_logprobs=1, max_tokens=2
    )
    ChatCompletion.model_validate(done.model_dump())
    assert [c.index for c in done.choices] == [0, 1]
    first = done.choices[0].logprobs
    assert first is not None and first.content is not None
    assert [t.token for t in first.content] == ["<|user|>", " one"]
    assert done.usage is not None and done.usage.completion_tokens == 4
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=msgs, response_format={"type": "json_object"}
        )
    assert refused.value.param == "response_format"
    with pytest.raises(BadRequestError) as streamed:
        client.chat.completions.create(model=MODEL, messages=msgs, stream=True, logprobs=True)
    assert streamed.value.param == "logprobs"
