"""Priority and scale-out through real processes: the sim engine, real queue, real database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from sluice.models import requests
from sluice.queue import make_celery
from tests.e2e.conftest import Running, start_stack

COMPLETIONS = "/v1/completions"
MODEL = "sluice-sim"
# A small, slow-enough device: 16 slots, 2 ms per decode step.
SIM = {
    "SLUICE_ENGINE": "sim",
    "SLUICE_MODEL": MODEL,
    "SLUICE_MAX_NUM_SEQS": "16",
    "SLUICE_MAX_MODEL_LEN": "512",
    "SLUICE_SIM_DECODE_STEP": "0.002",
    "SLUICE_SIM_DECODE_PER_SEQ": "0",
    "SLUICE_SIM_PREFILL_PER_TOKEN": "0",
}


@pytest.fixture
def sim_dir(backend: str, tmp_path: Path) -> Path:
    """A data directory per test (each test starts its own stack)."""
    return tmp_path / backend


def file_lines(n: int, max_tokens: int) -> list[dict[str, Any]]:
    """n completions lines of the same length."""
    return [
        {
            "custom_id": f"bulk-{i}",
            "method": "POST",
            "url": COMPLETIONS,
            "body": {"model": MODEL, "prompt": f"bulk request {i}", "max_tokens": max_tokens},
        }
        for i in range(n)
    ]


def submit_file(sluice: Running, lines: list[dict[str, Any]]) -> str:
    """Upload and start a completions batch without waiting for it."""
    return sluice.submit_file(lines, COMPLETIONS)


def finished_times(sluice: Running, batch_id: str) -> list[tuple[str, float, str | None, int]]:
    """(status, finished_at, lease_owner, attempts) of every request of a batch."""
    db = create_engine(sluice.settings.resolved_database_url)
    try:
        with db.connect() as conn:
            rows = conn.execute(
                select(
                    requests.c.status,
                    requests.c.finished_at,
                    requests.c.lease_owner,
                    requests.c.attempts,
                ).where(requests.c.batch_id == batch_id)
            ).all()
    finally:
        db.dispose()
    return [(r.status, r.finished_at, r.lease_owner, r.attempts) for r in rows]


def start_worker(sluice: Running) -> subprocess.Popen[bytes]:
    """Another `sluice worker` process with the environment the stack gives its own."""
    stack = sluice.stack
    env = {
        **os.environ,
        **stack.extra_env,
        "SLUICE_REDIS_URL": stack.redis.url,
        "SLUICE_DATA_DIR": str(stack.settings.data_dir.resolve()),
        "SLUICE_DATABASE_URL": stack.settings.resolved_database_url,
    }
    log = open(stack.settings.data_dir / "worker2.log", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "worker"], env=env, stdout=log, stderr=log
    )


def wait_consumers(sluice: Running, n: int, timeout: float = 60) -> None:
    """Until n workers answer a Celery ping (their consumers take messages from then on)."""
    app = make_celery(sluice.settings, sluice.stack.redis.url)
    deadline = time.monotonic() + timeout
    while len(app.control.ping(timeout=0.5)) < n:
        assert time.monotonic() < deadline, f"{n} workers never answered a ping"


@pytest.fixture
def one_worker(backend: str, sim_dir: Path) -> Iterator[Running]:
    """API and one sim worker."""
    yield from start_stack(backend, sim_dir, **SIM)


@pytest.fixture
def two_workers(backend: str, sim_dir: Path) -> Iterator[tuple[Running, set[int]]]:
    """API and two sim workers on one queue; yields the stack and the workers' pids."""
    # Small messages, and few held at once per worker: a worker cannot take the whole file
    # before the other one asks, so both must do part of it.
    env = {**SIM, "SLUICE_CHUNK_SIZE": "20", "SLUICE_WORKER_THREADS": "4"}
    for sluice in start_stack(backend, sim_dir, **env):
        second = start_worker(sluice)
        try:
            wait_consumers(sluice, 2)
            yield sluice, {sluice.stack.procs[1].pid, second.pid}
        finally:
            second.terminate()
            try:
                second.wait(60)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()


def test_interactive_job_overtakes_a_running_file(one_worker: Running) -> None:
    sluice = one_worker
    n = 800
    # 800 x 40 tokens on 16 slots: about 2,000 steps of work queued ahead of the job.
    batch_id = submit_file(sluice, file_lines(n, max_tokens=40))
    deadline = time.monotonic() + 60
    while sluice.http.get(f"/v1/batches/{batch_id}").json()["request_counts"]["completed"] < 50:
        assert time.monotonic() < deadline, "the file never started"
        time.sleep(0.02)
    r = sluice.http.post("/v1/jobs", json={"model": MODEL, "prompt": "me first", "max_tokens": 8})
    assert r.status_code == 202, r.text
    job = sluice.http.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job
    assert job["usage"]["completion_tokens"] == 8
    batch = sluice.wait_batch(batch_id)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    # Admitted ahead of the queued bulk work: most of the file finished after the job did.
    job_done = job["timings"]["finished_at"]
    after = [t for _, t, _, _ in finished_times(sluice, batch_id) if t > job_done]
    assert len(after) > n // 2, f"only {len(after)} of {n} bulk requests finished after the job"


def test_two_workers_share_one_file(two_workers: tuple[Running, set[int]]) -> None:
    sluice, pids = two_workers
    n = 400
    batch = sluice.run_file(file_lines(n, max_tokens=20), COMPLETIONS)
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    rows = finished_times(sluice, batch["id"])
    assert len(rows) == n
    assert {status for status, _, _, _ in rows} == {"succeeded"}
    # Each request ran once (one claim), and both workers did part of the file.
    assert {attempts for _, _, _, attempts in rows} == {1}
    owners = Counter(owner for _, _, owner, _ in rows)
    assert None not in owners
    # Two owners: the stack's worker (named by its supervisor) and the second one.
    assert len(owners) == len(pids) == 2, owners
    # Exactly one result per line in the output file.
    out = Counter(x["custom_id"] for x in sluice.lines(batch["output_file_id"]))
    assert out == Counter(f"bulk-{i}" for i in range(n))
    assert batch["error_file_id"] is None
