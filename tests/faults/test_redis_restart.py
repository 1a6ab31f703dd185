"""Redis SIGKILLed and restarted empty mid-run: the worker carries on, nothing is lost."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sluice.queue import make_celery
from tests.e2e.conftest import Running, start_stack
from tests.faults.conftest import SIM_ENV, completion_lines, submit
from tests.servers import RedisServer, redis_server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may kill."""
    with redis_server() as server:
        yield server


@pytest.fixture
def stack_on_own_redis(own_redis: RedisServer, tmp_path: Path) -> Iterator[Running]:
    """SQLite and the test's redis-server."""
    os.environ["SLUICE_REDIS_URL"] = own_redis.url
    try:
        yield from start_stack(
            "sqlite", tmp_path / "data", **SIM_ENV, SLUICE_MAX_NUM_SEQS="32",
            SLUICE_REDIS_URL=own_redis.url,
        )  # fmt: skip
    finally:
        os.environ.pop("SLUICE_REDIS_URL", None)


def test_redis_killed_and_restarted_empty(
    stack_on_own_redis: Running, own_redis: RedisServer
) -> None:
    sluice = stack_on_own_redis
    worker = sluice.stack.procs[sluice.stack.names.index("worker")]
    batch_id = submit(sluice, completion_lines(3000))
    sluice.wait_for(lambda: sluice.http.get(f"/v1/batches/{batch_id}").json()
                    ["request_counts"]["completed"] >= 300)  # fmt: skip
    own_redis.kill()
    # Jobs submitted while Redis is down: accepted (committed) or refused with 503, never 500.
    accepted: list[str] = []
    for i in range(5):
        r = sluice.http.post("/v1/jobs", json={"prompt": f"during outage {i}", "max_tokens": 4})
        assert r.status_code in (202, 503), r.text
        if r.status_code == 202:
            accepted.append(r.json()["id"])
    own_redis.start()
    for i in range(5):
        r = sluice.http.post("/v1/jobs", json={"prompt": f"after restart {i}", "max_tokens": 4})
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])
    done = sluice.wait_batch(batch_id, timeout=180)
    assert done["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
    for job_id in accepted:
        deadline = time.monotonic() + 60
        while (job := sluice.http.get(f"/v1/jobs/{job_id}").json())["status"] in (
            "queued", "running", "in_progress",
        ):  # fmt: skip
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] in ("succeeded", "completed"), job
    # The same worker process did it all: no manual (or supervised) restart was needed, and
    # its consumer is back on the new Redis (it answers a broadcast ping).
    assert worker.poll() is None
    app = make_celery(sluice.settings, own_redis.url)
    sluice.wait_for(lambda: len(app.control.ping(timeout=0.5)) == 1, timeout=60)
    with httpx.Client(base_url=sluice.stack.url) as http:
        # Ready again once the worker's next stats publish (every second) reaches the new,
        # empty Redis: /readyz counts only workers whose stats it can read.
        sluice.wait_for(lambda: http.get("/readyz").status_code == 200, timeout=30)
