"""The official openai package runs its whole batch workflow against Sluice unchanged."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import ConflictError, NotFoundError, OpenAI

from tests.e2e.conftest import Running, start_stack

MODEL = "sluice-echo"


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A stack on the echo engine."""
    yield from start_stack(backend, Path(tmp_path_factory.mktemp(f"openai-{backend}")))


@pytest.fixture(scope="module")
def client(sluice: Running) -> OpenAI:
    """The real OpenAI client pointed at Sluice."""
    return OpenAI(base_url=f"{sluice.stack.url}/v1", api_key=sluice.stack.api_key, max_retries=0)


def _jsonl(lines: list[dict[str, object]]) -> io.BytesIO:
    buf = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    buf.name = "batch.jsonl"
    return buf


def _wait(client: OpenAI, batch_id: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.monotonic() < deadline, f"batch stuck in {b.status}"
        time.sleep(0.1)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_whole_workflow(client: OpenAI, endpoint: str) -> None:
    n = 50
    if endpoint == "/v1/chat/completions":
        bodies = [
            {
                "model": MODEL,
                "max_tokens": 5,
                "messages": [{"role": "user", "content": f"tell me all about item {i}"}],
            }
            for i in range(n)
        ]
    else:
        bodies = [
            {"model": MODEL, "max_tokens": 5, "prompt": f"tell me all about item {i}"}
            for i in range(n)
        ]
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": b}
        for i, b in enumerate(bodies)
    ]
    f = client.files.create(file=_jsonl(lines), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and f.object == "file"
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"run": "ci"},
    )
    assert batch.metadata == {"run": "ci"}
    done = client.batches.retrieve(batch.id)
    done = _wait(client, batch.id)  # type: ignore[assignment]
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (
        done.request_counts.total,
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (n, n, 0)
    assert done.usage is not None and done.usage.output_tokens == 5 * n
    assert done.in_progress_at and done.completed_at and done.finalizing_at
    assert done.output_file_id is not None
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in out) == sorted(f"c{i}" for i in range(n))
    expect_object = "chat.completion" if "chat" in endpoint else "text_completion"
    for x in out:
        body = x["response"]["body"]
        assert body["object"] == expect_object
        assert body["usage"]["completion_tokens"] == 5
    listed = client.batches.list(limit=100)
    assert batch.id in [b.id for b in listed.data]


def test_cancel_finished_batch_and_errors(client: OpenAI) -> None:
    lines = [
        {
            "custom_id": "only",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "x"},
        }
    ]
    f = client.files.create(file=_jsonl(lines), purpose="batch")
    b = client.batches.create(
        input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
    )
    assert _wait(client, b.id).status == "completed"  # type: ignore[attr-defined]
    with pytest.raises(ConflictError):
        client.batches.cancel(b.id)
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_does_not_exist")
    assert client.files.delete(f.id).deleted
    with pytest.raises(NotFoundError):
        client.files.retrieve(f.id)
