"""Online endpoints against the real API, Redis and database, with the worker's side played
through the store and the Redis Stream contract: retries never duplicate or garble streamed
text, lost pieces come from the row, time and queue limits answer 504/429 with Retry-After."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api.routes.online import _Relay
from sluice.deltas import stream_key
from sluice.models import requests
from sluice.store import work
from sluice.store.work import Result
from tests.api.helpers import Api

OWNER = "test-worker"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def online(start_api: Callable[..., AbstractContextManager[Api]]) -> Iterator[Api]:
    """An API without a worker: the tests act as the worker."""
    with start_api(online_timeout=20) as api:
        yield api


def _job(api: Api, rid: int) -> str:
    with api.db.read() as conn:
        return str(conn.execute(select(requests.c.batch_id).where(requests.c.id == rid)).scalar())


def _piece(api: Api, rid: int, attempt: int, offset: int, text: str) -> None:
    api.redis.xadd(stream_key(_job(api, rid), rid), {"a": attempt, "o": offset, "t": text})


def _end(api: Api, rid: int, attempt: int) -> None:
    api.redis.xadd(stream_key(_job(api, rid), rid), {"a": attempt, "e": 1})


def _finish(api: Api, rid: int, text: str) -> None:
    done = work.write_results(
        api.db, OWNER, [Result(rid, "succeeded", text, "stop", None, None, 3, 2, time.time())]
    )
    for batch_id in done:
        api.redis.publish(f"sluice:done:{batch_id}", "done")


def _events(lines: Iterator[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _content(events: list[Any]) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    ]


def _stream(api: Api, act: Callable[[int], None]) -> list[Any]:
    """Open a streamed chat request, play the worker's part with act(request id), read it."""
    body = {"model": api.model, "messages": MESSAGES, "stream": True}
    with api.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        rid = int(json.loads(first[len("data: ") :])["id"].removeprefix("chatcmpl-"))
        act(rid)
        return _events(lines)


def test_a_retried_request_streams_each_piece_once(online: Api) -> None:
    def worker(rid: int) -> None:
        assert [c.id for c in work.claim(online.db, [rid], OWNER, 60)] == [rid]
        _piece(online, rid, 1, 0, "Hello")
        # The first worker lets go (a shutdown past its grace); the row runs again
        # (attempt 2) and streams from the start.
        work.release(online.db, OWNER, [rid], 3, charge=False)
        assert [c.attempts for c in work.claim(online.db, [rid], OWNER, 60)] == [2]
        _piece(online, rid, 2, 0, "Hello wor")
        _piece(online, rid, 2, 9, "ld")
        _finish(online, rid, "Hello world")
        _end(online, rid, 2)

    events = _stream(online, worker)
    assert _content(events) == ["Hello", " wor", "ld"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"


def test_a_retry_with_other_text_ends_the_stream_with_an_error(online: Api) -> None:
    def worker(rid: int) -> None:
        work.claim(online.db, [rid], OWNER, 60)
        _piece(online, rid, 1, 0, "Hello")
        work.release(online.db, OWNER, [rid], 3, charge=False)
        work.claim(online.db, [rid], OWNER, 60)
        _piece(online, rid, 2, 0, "Howdy")

    events = _stream(online, worker)
    assert _content(events) == ["Hello"]
    assert events[-2]["error"]["code"] == "stream_interrupted"
    assert events[-1] == "[DONE]"


def test_lost_pieces_come_from_the_row(online: Api) -> None:
    def worker(rid: int) -> None:
        work.claim(online.db, [rid], OWNER, 60)
        _piece(online, rid, 1, 0, "Hel")
        _piece(online, rid, 1, 10, "d")  # offsets 3-9 never arrived (trimmed or dropped)
        _finish(online, rid, "Hello world")
        _end(online, rid, 1)

    assert _content(_stream(online, worker)) == ["Hel", "lo world"]


def test_without_the_end_marker_the_done_notice_ends_the_stream(online: Api) -> None:
    def worker(rid: int) -> None:
        work.claim(online.db, [rid], OWNER, 60)
        _piece(online, rid, 1, 0, "Hi")
        _finish(online, rid, "Hi there")

    assert _content(_stream(online, worker)) == ["Hi", " there"]


def test_relay_skips_stale_attempts_and_duplicates() -> None:
    relay = _Relay()
    assert relay.take({b"a": b"2", b"o": b"0", b"t": b"ab"}) == "ab"
    relay.sent = "ab"
    assert relay.take({b"a": b"1", b"o": b"2", b"t": b"zz"}) == ""  # an older attempt
    assert relay.take({b"a": b"2", b"o": b"0", b"t": b"ab"}) == ""  # seen already
    assert relay.take({b"a": b"3", b"o": b"0", b"t": b"abc"}) == "c"
    assert relay.take({b"a": b"4", b"o": b"0", b"t": b"x"}) is None


def test_an_answer_past_the_time_limit_is_504_and_cancelled(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(online_timeout=0.5) as api:
        started = time.monotonic()
        response = api.http.post(
            "/v1/chat/completions", json={"model": api.model, "messages": MESSAGES}
        )
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 5
        assert response.headers["Retry-After"] == str(api.settings.retry_after_seconds)
        assert response.json()["error"]["code"] == "timeout"
        job = api.http.get(f"/v1/jobs/{response.headers['Sluice-Job-Id']}").json()
        assert job["status"] == "cancelled", job
        streamed = api.http.post(
            "/v1/chat/completions",
            json={"model": api.model, "messages": MESSAGES, "stream": True},
        )
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-2][len("data: ") :])["error"]["code"] == "timeout"
        assert events[-1] == "data: [DONE]"
        job = api.http.get(f"/v1/jobs/{streamed.headers['Sluice-Job-Id']}").json()
        assert job["status"] == "cancelled", job


def test_a_full_queue_answers_429_with_retry_after(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_queued_requests=1) as api:
        assert api.http.post("/v1/jobs", json={"prompt": "fill"}).status_code == 202
        response = api.http.post(
            "/v1/completions", json={"model": api.model, "prompt": "x", "stream": True}
        )
        assert response.status_code == 429, response.text
        assert response.headers["Retry-After"] == str(api.settings.retry_after_seconds)
        assert response.json()["error"]["code"] == "queue_full"


def test_a_client_that_gives_up_waiting_cancels_its_request(online: Api) -> None:
    body = {"model": online.model, "messages": MESSAGES}
    with (
        httpx.Client(base_url=online.url, timeout=1.0, headers=online.http.headers) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/chat/completions", json=body)
    # Nobody runs it here: the API notices the closed connection within a second and cancels.
    deadline = time.monotonic() + 10
    with online.db.read() as conn:
        latest = conn.execute(select(requests.c.batch_id).order_by(requests.c.id.desc())).first()
    assert latest is not None
    while (job := online.http.get(f"/v1/jobs/{latest[0]}").json())["status"] != "cancelled":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_too_many_waiting_answers_429(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_long_polls=1, online_timeout=20) as api:
        body = {"model": api.model, "messages": MESSAGES, "stream": True}
        with api.http.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the stream is open and waiting
            second = api.http.post("/v1/chat/completions", json=body)
            assert second.status_code == 429, second.text
            assert second.headers["Retry-After"] == str(api.settings.retry_after_seconds)
            assert second.json()["error"]["code"] == "too_many_waiting"
