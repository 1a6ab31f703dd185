"""Online endpoints through the whole stack (API and sim worker as processes), driven by the
official openai client; every response validated with the client's own pydantic types."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.e2e.conftest import Running, start_stack
from worker.stats import read_stats

MODEL = "sluice-echo"
ALIAS = "gpt-4o-mini"
# A sim decode step of 10 ms: a 40-token answer takes about 0.4 s, in 40 steps.
ENV = {
    "SLUICE_ENGINE": "sim",
    "SLUICE_SIM_DECODE_STEP": "0.01",
    "SLUICE_MAX_NUM_SEQS": "8",
    "SLUICE_MODEL_ALIASES": f"{ALIAS}={MODEL}",
}
MESSAGES = [{"role": "user", "content": "tell me about sluices"}]
# The sim engine cycles the templated prompt's words.
CHAT_WORDS = ["<|user|>", "tell", "me", "about", "sluices", "<|assistant|>"]


def chat_text(n: int) -> str:
    """The sim engine's answer of n tokens to MESSAGES."""
    return " ".join(CHAT_WORDS[i % len(CHAT_WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A stack on the sim engine, with an alias; its HTTP client sends the local admin key."""
    for running in start_stack(backend, Path(tmp_path_factory.mktemp(f"online-{backend}")), **ENV):
        running.http.headers.update(getattr(running.stack, "auth_headers", {}))
        yield running


@pytest.fixture(scope="module")
def client(sluice: Running) -> OpenAI:
    """The official client, pointed at Sluice by base_url only."""
    key = getattr(sluice.stack, "api_key", None) or "sk-local"
    return OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=key, max_retries=0)


def test_chat_completion(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=ALIAS,
        messages=MESSAGES,
        max_tokens=7,  # type: ignore[arg-type]
    )
    body = json.loads(raw.text)
    completion = ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == chat_text(7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert completion.model == MODEL
    assert raw.headers["Sluice-Job-Id"].startswith("job_")


def test_completion(client: OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="one two three", max_tokens=5
    )
    completion = Completion.model_validate(json.loads(raw.text))
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "one two three one two"


def _sse(sluice: Running, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The data events of a streamed answer, parsed (the last must be [DONE])."""
    events: list[str] = []
    with sluice.http.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_stream_pieces_join_to_the_answer(sluice: Running, client: OpenAI) -> None:
    n = 40
    body = {
        "model": ALIAS,
        "messages": MESSAGES,
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = [
        ChatCompletionChunk.model_validate(e) for e in _sse(sluice, "/v1/chat/completions", body)
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == chat_text(n)
    # Word by word as the engine steps, not one lump at the end.
    assert len(pieces) >= n // 2, pieces
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])
    # The client's own streaming reader gets the same text.
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=MESSAGES,
        max_tokens=n,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat_text(n)


def test_completion_stream(sluice: Running, client: OpenAI) -> None:
    events = _sse(
        sluice,
        "/v1/completions",
        {"model": MODEL, "prompt": "a b c", "max_tokens": 6, "stream": True},
    )
    assert "".join(e["choices"][0]["text"] for e in events) == "a b c a b c"
    # The client's Completion type requires a finish reason: the last chunk carries it.
    last = Completion.model_validate(events[-1])
    assert last.choices[0].finish_reason == "length"
    assert all(e["object"] == "text_completion" for e in events)
    stream = client.completions.create(model=MODEL, prompt="a b c", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in stream) == "a b c a b c"


def test_bad_requests_name_the_field(client: OpenAI) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
    assert f"available: {MODEL}, {ALIAS}" in str(missing.value)
    with pytest.raises(BadRequestError) as bad:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "wizard", "content": "x"}],  # type: ignore[list-item,misc]
        )
    assert bad.value.body is not None and "role" in str(bad.value.body)
    with pytest.raises(BadRequestError) as options:
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    assert "stream_options" in str(options.value.body)


def _until(sluice: Running, check: Callable[[], bool], timeout: float) -> None:
    """Poll until check() holds; the failure shows this stack's workers' stats."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, [
            {k: s[k] for k in ("busy", "inflight", "completed", "slots", "engine")}
            for s in _mine(sluice)
        ]
        time.sleep(0.05)


def _mine(sluice: Running) -> list[dict[str, Any]]:
    """This stack's workers' stats (a shared Redis may hold other stacks' workers too)."""
    owners = {c.worker_id for c in sluice.stack.children if c.worker_id}
    return [s for owner, s in read_stats(sluice.redis).items() if owner in owners]


def _busy(sluice: Running) -> int:
    return sum(int(s["busy"]) for s in _mine(sluice))


def test_a_client_that_disconnects_frees_its_engine_slot(sluice: Running) -> None:
    # 3,000 tokens at 10 ms a step: 30 s unless the request is aborted.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3000, "stream": True}
    with (
        httpx.Client(base_url=sluice.stack.url, timeout=30, headers=sluice.http.headers) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        job_id = response.headers["Sluice-Job-Id"]
        content = 0
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                content += 1
                if content == 3:
                    break
        assert content == 3
        _until(sluice, lambda: _busy(sluice) >= 1, 10)
        # Leaving the block closes the connection mid-stream.
    started = time.monotonic()
    _until(sluice, lambda: _busy(sluice) == 0, 15)
    assert time.monotonic() - started < 15
    job = sluice.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled", job
    assert (job["usage"] or {}).get("completion_tokens", 0) < 3000


def test_a_finished_job_carries_its_openai_body(sluice: Running) -> None:
    submitted = sluice.http.post("/v1/jobs", json={"messages": MESSAGES, "max_tokens": 4})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["response"] is None  # not finished yet
    job = sluice.http.get(f"/v1/jobs/{submitted.json()['id']}?wait=30").json()
    assert job["status"] == "succeeded"
    completion = ChatCompletion.model_validate(job["response"])
    assert completion.choices[0].message.content == chat_text(4) == job["output"]
