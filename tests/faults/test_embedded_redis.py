"""`sluice up`'s embedded redis-server killed: its supervisor restarts it and work goes on."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Running, start_stack
from tests.faults.conftest import SIM_ENV, completion_lines, submit, supervised


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Running]:
    """SQLite and the embedded redis-server, as a user's `sluice up` has them."""
    yield from start_stack("sqlite", tmp_path, **SIM_ENV, SLUICE_MAX_NUM_SEQS="32")


def test_killed_embedded_redis_is_restarted(embedded: Running) -> None:
    sluice = embedded
    server = sluice.stack.redis.server
    assert server is not None and server.pid is not None
    worker = sluice.stack.procs[sluice.stack.names.index("worker")]
    with supervised(sluice):
        batch_id = submit(sluice, completion_lines(2000))
        first = server.pid
        os.kill(first, signal.SIGKILL)
        sluice.wait_for(lambda: server.pid not in (None, first), timeout=30)
        job = sluice.http.post("/v1/jobs", json={"prompt": "after redis", "max_tokens": 4})
        assert job.status_code == 202, job.text
        done = sluice.wait_batch(batch_id, timeout=180)
        assert done["request_counts"] == {"total": 2000, "completed": 2000, "failed": 0}
        result = sluice.http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 60}).json()
        assert result["status"] == "succeeded", result
    # The worker rode it out: never restarted.
    assert worker.poll() is None
