"""Outages seen by the API: its own PostgreSQL cluster stopped, its own Redis SIGKILLed.

Every answer during an outage is a success or a 503 with Retry-After (never a 500, never a
dropped keep-alive connection); after the restart the first call succeeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from sqlalchemy import select

from sluice.config import load_settings
from sluice.db import get_database
from sluice.migrate import upgrade
from sluice.models import requests
from sluice.queue import done_channel
from sluice.store.work import Result, claim, write_results
from tests.api.conftest import serve
from tests.api.helpers import batch_line, jsonl
from tests.servers import PgCluster, RedisServer, pg_cluster, redis_server

OUTAGE_SECONDS = 3.0
SHARED_REDIS = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this module's own, migrated."""
    with pg_cluster() as running:
        upgrade(running.url)
        yield running


@contextmanager
def api_on(tmp: Path, **overrides: Any) -> Iterator[httpx.Client]:
    """The API in a thread with these settings; yields a keep-alive client."""
    # Auth off: these tests take the database away, and key checks would need it (they are
    # tested in tests/api/test_auth.py). State changes still need an Authorization header.
    settings = load_settings(
        data_dir=tmp,
        engine="echo",
        model="outage-test",
        max_wait_seconds=30.0,
        auth="off",
        # No worker runs here: readiness is about the database and Redis alone.
        ready_requires_worker=False,
        **overrides,
    )
    headers = {"Authorization": "Bearer outage-test"}
    with serve(settings) as url, httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        yield http


def _stream(response: httpx.Response) -> int:
    # Same object across answers: the keep-alive connection was never closed.
    return id(response.extensions["network_stream"])


def _calls(ids: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """One call of every route that needs the database."""
    upload = {
        "files": {"file": ("f.jsonl", jsonl([batch_line("a", "outage-test")]))},
        "data": {"purpose": "batch"},
    }
    batch = {"json": {"input_file_id": ids["file"], "endpoint": "/v1/chat/completions"}}
    return [
        ("GET", "/v1/files", {}),
        ("GET", f"/v1/files/{ids['file']}", {}),
        ("GET", f"/v1/files/{ids['file']}/content", {}),
        ("DELETE", f"/v1/files/{ids['file']}", {}),
        ("POST", "/v1/files", upload),
        ("GET", "/v1/batches", {}),
        ("GET", f"/v1/batches/{ids['batch']}", {}),
        ("GET", f"/v1/batches/{ids['batch']}/results", {}),
        ("POST", f"/v1/batches/{ids['batch']}/cancel", {}),
        ("POST", "/v1/batches", batch),
        ("POST", "/v1/jobs", {"json": {"prompt": "during the outage"}}),
        ("GET", f"/v1/jobs/{ids['job']}", {}),
        ("GET", f"/v1/jobs/{ids['job']}", {"params": {"wait": 1}}),
        ("POST", f"/v1/jobs/{ids['job']}/cancel", {}),
    ]


def _make_ids(http: httpx.Client) -> dict[str, str]:
    f = http.post(
        "/v1/files",
        files={"file": ("f.jsonl", jsonl([batch_line("a", "outage-test")]))},
        data={"purpose": "batch"},
    )
    assert f.status_code == 200, f.text
    b = http.post(
        "/v1/batches",
        json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    assert b.status_code == 200, b.text
    j = http.post("/v1/jobs", json={"prompt": "before"})
    assert j.status_code == 202, j.text
    return {"file": f.json()["id"], "batch": b.json()["id"], "job": j.json()["id"]}


def _assert_503(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text)
    assert int(response.headers["retry-after"]) > 0, what
    err = response.json()["error"]
    assert err["code"] == "service_unavailable" and err["type"] == "server_error", err


def test_database_outage_answers_503_and_recovers(
    cluster: PgCluster, tmp_path: Path, redis_url: str
) -> None:
    with api_on(tmp_path, database_url=cluster.url, redis_url=redis_url) as http:
        ids = _make_ids(http)
        streams = {_stream(http.get("/readyz"))}
        cluster.stop()
        try:
            deadline = time.monotonic() + OUTAGE_SECONDS
            rounds = 0
            while time.monotonic() < deadline or rounds == 0:
                rounds += 1
                for method, path, kwargs in _calls(ids):
                    response = http.request(method, path, **kwargs)
                    _assert_503(response, f"{method} {path}")
                    streams.add(_stream(response))
                ready = http.get("/readyz")
                assert ready.status_code == 503 and ready.json()["down"] == ["database"]
                assert ready.headers["retry-after"]
                # The error's text (host, port, driver message) stays in the server's log.
                assert str(cluster.port) not in ready.text and "connect" not in ready.text
                streams.add(_stream(ready))
        finally:
            cluster.start()
        assert len(streams) == 1, "a keep-alive connection was closed during the outage"
        # The first call after the restart succeeds: no stale pooled connection is used.
        first = http.post("/v1/jobs", json={"prompt": "after"})
        assert first.status_code == 202, first.text
        assert http.get(f"/v1/batches/{ids['batch']}").status_code == 200
        assert http.get("/readyz").status_code == 200


def test_a_quick_database_restart_costs_no_call(
    cluster: PgCluster, tmp_path: Path, redis_url: str
) -> None:
    with api_on(tmp_path, database_url=cluster.url, redis_url=redis_url) as http:
        ids = _make_ids(http)
        for _ in range(3):
            # Stop and start in a fraction of a second, no call in between: every pooled
            # connection is dead, and the next calls (a write, then a read) still succeed.
            cluster.stop()
            cluster.start()
            submitted = http.post("/v1/jobs", json={"prompt": "right after"})
            assert submitted.status_code == 202, submitted.text
            cluster.stop()
            cluster.start()
            read = http.get(f"/v1/jobs/{ids['job']}")
            assert read.status_code == 200, read.text


@pytest.fixture
def redis_url() -> str:
    """The shared test Redis (database 15): the database tests stop only PostgreSQL."""
    return SHARED_REDIS


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own."""
    with redis_server() as server:
        yield server


def _finish(db_url: str, job_id: str, redis: RedisServer) -> None:
    """Do what a worker does when it finishes a job: claim, write, announce."""
    db = get_database(load_settings(database_url=db_url))
    with db.read() as conn:
        rid = conn.execute(select(requests.c.id).where(requests.c.batch_id == job_id)).scalar_one()
    (claimed,) = claim(db, [rid], "test-worker", 60)
    write_results(
        db,
        "test-worker",
        [Result(id=claimed.id, status="succeeded", output_text="ok", finish_reason="stop",
                prompt_tokens=1, completion_tokens=1, finished_at=time.time())],
    )  # fmt: skip
    client = redis_lib.Redis.from_url(redis.url)
    client.publish(done_channel(job_id), "done")
    client.close()


def _poll(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_redis_outage_keeps_submits_and_never_answers_500(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'sluice.db'}"
    upgrade(db_url)
    with api_on(tmp_path, database_url=db_url, redis_url=own_redis.url) as http:
        assert http.get("/readyz").status_code == 200
        own_redis.kill()

        kept = []
        for i in range(5):
            started = time.monotonic()
            response = http.post("/v1/jobs", json={"prompt": f"during {i}"})
            assert time.monotonic() - started < 10
            assert response.status_code in (202, 503), response.text
            if response.status_code == 202:
                kept.append(response.json()["id"])
            else:
                _assert_503(response, "submit")
        assert kept, "no submit was kept while Redis was down"
        for job_id in kept:
            view = http.get(f"/v1/jobs/{job_id}")
            assert view.status_code == 200 and view.json()["status"] == "queued"
        # A long-poll without Redis looks at the database instead of failing.
        waited = http.get(f"/v1/jobs/{kept[0]}", params={"wait": 1.5})
        assert waited.status_code == 200 and waited.json()["status"] == "queued"
        f = http.post(
            "/v1/files",
            files={"file": ("f.jsonl", jsonl([batch_line("a", "outage-test")]))},
            data={"purpose": "batch"},
        )
        assert f.status_code == 200, f.text
        b = http.post(
            "/v1/batches",
            json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions"},
        )
        assert b.status_code == 200 and b.json()["status"] == "in_progress", b.text
        assert http.post(f"/v1/jobs/{kept[-1]}/cancel").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["down"] == ["redis"]
        assert str(own_redis.port) not in ready.text

        # Redis comes back empty: readiness returns and long-polls are woken by notices again.
        own_redis.start()
        _poll(lambda: http.get("/readyz").status_code == 200, "readiness after Redis restarted")
        job = http.post("/v1/jobs", json={"prompt": "after"}).json()["id"]
        _poll(lambda: http.get("/readyz").json()["long_polls"] == 0, "no waiters")
        _poll(lambda: http.get("/readyz").json()["listener"] == "subscribed", "the listener")
        finisher = threading.Thread(
            target=_finish_when_waiting, args=(http, db_url, job, own_redis)
        )
        finisher.start()
        started = time.monotonic()
        done = http.get(f"/v1/jobs/{job}", params={"wait": 20})
        finisher.join()
        assert done.json()["status"] == "succeeded"
        assert time.monotonic() - started < 10


def _finish_when_waiting(http: httpx.Client, db_url: str, job: str, redis: RedisServer) -> None:
    with httpx.Client(base_url=str(http.base_url)) as other:
        _poll(lambda: other.get("/readyz").json()["long_polls"] >= 1, "the long-poll to wait")
    _finish(db_url, job, redis)
