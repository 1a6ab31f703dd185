"""An accepted online request survives a worker killed mid-answer: the row is retried by the
next worker, and a streaming client gets the whole text once, then [DONE]."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select

from sluice.models import requests
from tests.e2e.conftest import Running, start_stack

MESSAGES = [{"role": "user", "content": "tell me about sluices"}]
WORDS = ["<|user|>", "tell", "me", "about", "sluices", "<|assistant|>"]
TOKENS = 150  # 1.5 s at 10 ms a step: time to kill the worker mid-answer


@pytest.fixture
def sluice(backend: str, tmp_path: Path) -> Iterator[Running]:
    """Sim engine slow enough to kill mid-answer, short leases, eager reconciler."""
    for running in start_stack(
        backend,
        tmp_path,
        SLUICE_ENGINE="sim",
        SLUICE_MAX_NUM_SEQS="4",
        SLUICE_SIM_DECODE_STEP="0.01",
        SLUICE_SIM_DECODE_PER_SEQ="0",
        SLUICE_LEASE_SECONDS="1.5",
        SLUICE_RECONCILE_INTERVAL="0.2",
    ):
        running.http.headers.update(getattr(running.stack, "auth_headers", {}))
        yield running


def test_a_stream_survives_its_worker_being_killed(sluice: Running) -> None:
    pieces: list[str] = []
    events: list[Any] = []
    started = threading.Event()
    job: dict[str, str] = {}

    def client() -> None:
        body = {"model": "sluice-echo", "messages": MESSAGES, "max_tokens": TOKENS, "stream": True}
        with (
            httpx.Client(base_url=sluice.stack.url, timeout=90, headers=sluice.http.headers) as h,
            h.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            job["id"] = response.headers["Sluice-Job-Id"]
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                event = data if data == "[DONE]" else json.loads(data)
                events.append(event)
                if isinstance(event, dict) and event.get("choices"):
                    piece = event["choices"][0]["delta"].get("content")
                    if piece:
                        pieces.append(piece)
                        if len(pieces) >= 3:
                            started.set()

    reader = threading.Thread(target=client, daemon=True)
    reader.start()
    assert started.wait(60), "no text streamed"
    worker = sluice.stack.procs[1]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    sluice.stack.spawn("worker")
    reader.join(90)
    assert not reader.is_alive(), "the stream did not end"

    expected = " ".join(WORDS[i % len(WORDS)] for i in range(TOKENS))
    assert "".join(pieces) == expected  # every piece once: none lost, none repeated
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    db = create_engine(sluice.settings.resolved_database_url)
    with db.connect() as conn:
        row = conn.execute(
            select(requests.c.status, requests.c.attempts).where(requests.c.batch_id == job["id"])
        ).one()
    db.dispose()
    assert (row.status, row.attempts) == ("succeeded", 2)
