"""Sizes and load at the door: body and header limits, backpressure, many long-polls."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

import httpx

from tests.api.helpers import Api, batch_line, error_of, jsonl

MB = 1024 * 1024


def _connect(api: Api) -> socket.socket:
    url = urlsplit(api.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> bytes:
    """Whatever the server sends until it closes the connection (or 10 s pass)."""
    out = bytearray()
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return bytes(out)


def test_a_declared_200_mb_json_body_is_refused_before_it_is_read(api: Api) -> None:
    sock = _connect(api)
    try:
        started = time.monotonic()
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + api.auth_line
            + f"Content-Length: {200 * MB}\r\n\r\n".encode()
            + b'{"prompt": "'
        )
        answer = _read_response(sock)
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert elapsed < 5


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(api: Api) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"prompt": "'
        # No Content-Length: only counting while reading catches it. Far more than the
        # limit is offered; the server stops reading soon after the limit.
        while sent < 50 * MB:
            sent += 256 * 1024
            yield b"x" * (256 * 1024)
        yield b'"}'

    try:
        response = api.http.post(
            "/v1/jobs", content=body(), headers={"content-type": "application/json"}
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        # The server answered and closed while we were still sending: also a refusal.
        assert sent < 50 * MB
        return
    assert response.status_code == 413, response.text
    assert error_of(response)["code"] == "request_too_large"


def test_100_mb_of_headers_are_refused_quickly(api: Api) -> None:
    sock = _connect(api)
    sent = 0
    started = time.monotonic()
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ")
        chunk = b"a" * MB
        try:
            while sent < 100 * MB:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-flood
        answer = _read_response(sock)
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:200]
    assert sent < 20 * MB, f"the server read {sent} bytes of headers"
    assert elapsed < 10
    # The server is still fine.
    assert api.http.get("/healthz").status_code == 200


def test_a_long_url_is_refused_too(api: Api) -> None:
    sock = _connect(api)
    try:
        sock.sendall(
            b"GET /v1/files?after=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        answer = _read_response(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_beyond_the_queued_limit_submits_get_429_with_retry_after(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_queued_requests=3) as api:
        for i in range(3):
            accepted = api.http.post("/v1/jobs", json={"prompt": f"p{i}"})
            assert accepted.status_code == 202, accepted.text
        refused = api.http.post("/v1/jobs", json={"prompt": "one too many"})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) > 0
        body = refused.json()["error"]
        assert body["code"] == "queue_full" and body["type"] == "server_error"

        uploaded = api.upload(jsonl([batch_line("a", api.model)]))
        created = api.http.post(
            "/v1/batches",
            json={"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"},
        )
        assert created.status_code == 429, created.text
        assert created.json()["error"]["code"] == "queue_full"
        # Reads are never refused for load.
        assert api.http.get("/v1/batches").status_code == 200


def test_the_queued_limit_counts_rows_not_requests(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_queued_requests=3) as api:
        # One batch of four rows fills the queue past the limit at once.
        uploaded = api.upload(jsonl([batch_line(f"r{i}", api.model) for i in range(4)]))
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/chat/completions"}
        assert api.http.post("/v1/batches", json=body).status_code == 200
        assert api.http.post("/v1/jobs", json={"prompt": "x"}).status_code == 429


def _long_polls(api: Api, job_id: str, n: int, wait: float) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def poll() -> None:
        with httpx.Client(base_url=api.url, timeout=30, headers=api.http.headers) as http:
            status = http.get(f"/v1/jobs/{job_id}", params={"wait": wait}).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=poll) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while api.http.get("/readyz").json()["long_polls"] < n and time.monotonic() < deadline:
        time.sleep(0.02)
    ready = api.http.get("/readyz")
    for t in threads:
        t.join()
    assert ready.status_code == 200, ready.text
    return statuses


def test_150_concurrent_long_polls_share_one_redis_connection(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    # No worker here: readiness is judged on the API's own connections alone.
    with start_api(ready_requires_worker=False) as api:
        job = api.http.post("/v1/jobs", json={"prompt": "wait for me"}).json()
        statuses = _long_polls(api, job["id"], 150, wait=3)
        assert statuses == [200] * 150


def test_long_polls_past_the_cap_get_429(
    start_api: Callable[..., AbstractContextManager[Api]],
) -> None:
    with start_api(max_long_polls=5, ready_requires_worker=False) as api:
        job = api.http.post("/v1/jobs", json={"prompt": "wait for me"}).json()
        holders = [threading.Thread(target=_long_polls, args=(api, job["id"], 5, 3))]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 20
        while api.http.get("/readyz").json()["long_polls"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = api.http.get(f"/v1/jobs/{job['id']}", params={"wait": 3})
        assert refused.status_code == 429
        assert refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "too_many_long_polls"
        # Without wait it still answers.
        assert api.http.get(f"/v1/jobs/{job['id']}").status_code == 200
        for t in holders:
            t.join()
