"""A worker never hangs and never loses work: crashed threads, poison requests, SIGTERM, SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sluice.db import Database
from sluice.store.batches import create_job
from tests.e2e.conftest import Running, start_stack
from tests.faults.conftest import SIM_ENV, completion_lines, rows_of, submit, supervised
from worker.runner import EXIT_RUNNER_FAILED


def worker_proc(sluice: Running) -> subprocess.Popen[bytes]:
    """The stack's (current) worker process."""
    return sluice.stack.procs[sluice.stack.names.index("worker")]


@pytest.fixture
def crashing_writer(backend: str, tmp_path: Path) -> Iterator[Running]:
    """A worker whose writer thread dies on its third write; leases long (600 s)."""
    yield from start_stack(
        backend, tmp_path, **SIM_ENV, SLUICE_MAX_NUM_SEQS="8",
        SLUICE_FAULTS="thread-crash=writer:3",
    )  # fmt: skip


def test_dead_runner_thread_exits_nonzero_and_releases_its_rows(crashing_writer: Running) -> None:
    sluice = crashing_writer
    batch_id = submit(sluice, completion_lines(200))
    first = worker_proc(sluice)
    # Without the fail path the worker would wait forever for a writer that is gone.
    code = first.wait(timeout=30)
    assert code == EXIT_RUNNER_FAILED
    with rows_of(sluice, batch_id) as rows:
        # Released, not left running under a 600 s lease; a writer crash charges nobody.
        assert rows.count("running") == 0
        assert all(r.crashes == 0 for r in rows.all())
    sluice.stack.spawn("worker", env={"SLUICE_FAULTS": ""})
    # Far inside the lease: the rows were given back, not left to expire.
    done = sluice.wait_batch(batch_id, timeout=120)
    assert done["request_counts"] == {"total": 200, "completed": 200, "failed": 0}


@pytest.fixture
def hanging_engine(backend: str, tmp_path: Path) -> Iterator[Running]:
    """A worker whose engine step blocks for good on a marked prompt; 2 s stall limit."""
    yield from start_stack(
        backend, tmp_path, **SIM_ENV, SLUICE_MAX_NUM_SEQS="8",
        SLUICE_FAULTS="engine-hang-on=POISON", SLUICE_ENGINE_STALL_SECONDS="2",
    )  # fmt: skip


def test_stalled_engine_step_ends_the_worker(hanging_engine: Running) -> None:
    sluice = hanging_engine
    batch_id = submit(sluice, completion_lines(20, poison=5))
    assert worker_proc(sluice).wait(timeout=30) == EXIT_RUNNER_FAILED
    with rows_of(sluice, batch_id) as rows:
        assert rows.count("running") == 0
        charged = [r.custom_id for r in rows.all() if r.crashes]
    # The requests that were in the engine are charged one crash; the poison is among them.
    assert "r5" in charged


@pytest.fixture
def poison_stack(backend: str, tmp_path: Path) -> Iterator[Running]:
    """An engine that raises whenever the POISON prompt is in it; supervised restarts.

    128 in flight: isolation groups of 16, then of 2 were it not for the rule that the last
    step runs alone, so the test fails if that rule goes (the poison's partner would fail too).
    """
    yield from start_stack(
        backend, tmp_path, **SIM_ENV, SLUICE_MAX_NUM_SEQS="64",
        SLUICE_FAULTS="engine-crash-on=POISON",
    )  # fmt: skip


def test_poison_request_fails_alone(poison_stack: Running) -> None:
    sluice = poison_stack
    n, poison = 1000, 437
    with supervised(sluice):
        batch_id = submit(sluice, completion_lines(n, poison=poison))
        done = sluice.wait_batch(batch_id, timeout=240)
    assert done["request_counts"] == {"total": n, "completed": n - 1, "failed": 1}
    with rows_of(sluice, batch_id) as rows:
        by_id = {r.custom_id: r for r in rows.all()}
    bad = by_id.pop(f"r{poison}")
    assert (bad.status, bad.error_code, bad.crashes) == ("failed", "max_attempts_exceeded", 3)
    assert {r.status for r in by_id.values()} == {"succeeded"}
    # Its neighbours in the engine were charged but never reached the limit.
    charged = [r.crashes for r in by_id.values() if r.crashes]
    assert charged and max(charged) < 3


@pytest.fixture
def slow_stack(backend: str, tmp_path: Path) -> Iterator[Running]:
    """Slow generations (each request ~0.5 s) so that SIGTERM finds work held."""
    yield from start_stack(
        backend, tmp_path, **{**SIM_ENV, "SLUICE_SIM_DECODE_STEP": "0.01"},
        SLUICE_MAX_NUM_SEQS="32", SLUICE_SHUTDOWN_GRACE="3",
    )  # fmt: skip


def test_sigterm_returns_held_work_within_grace(slow_stack: Running) -> None:
    sluice = slow_stack
    batch_id = submit(sluice, completion_lines(10_000, max_tokens=50))
    worker = worker_proc(sluice)
    with rows_of(sluice, batch_id) as rows:
        sluice.wait_for(lambda: rows.count("succeeded") >= 32 and rows.count("running") > 0)
        worker.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = worker.wait(timeout=3 + 10)
        took = time.monotonic() - start
        assert code == 0, f"exit {code} after {took:.1f}s"
        assert rows.count("running") == 0
        assert rows.count("queued") + rows.count("succeeded") == 10_000
        # A shutdown charges nobody: nothing it gave back is a suspect.
        assert all(r.crashes == 0 for r in rows.all())
    # What it gave back runs on the next worker.
    sluice.stack.spawn("worker", env={"SLUICE_SIM_DECODE_STEP": "0.0005"})
    done = sluice.wait_batch(batch_id, timeout=240)
    assert done["request_counts"] == {"total": 10_000, "completed": 10_000, "failed": 0}


@pytest.fixture
def killable_stack(backend: str, tmp_path: Path) -> Iterator[Running]:
    """A supervised worker to SIGKILL (its leases released by the supervisor)."""
    yield from start_stack(backend, tmp_path, **SIM_ENV, SLUICE_MAX_NUM_SEQS="64")


def test_sigkilled_worker_three_times_loses_and_repeats_nothing(killable_stack: Running) -> None:
    sluice = killable_stack
    n = 10_000
    with supervised(sluice):
        batch_id = submit(sluice, completion_lines(n))
        with rows_of(sluice, batch_id) as rows:
            for kill in range(1, 4):
                sluice.wait_for(lambda k=kill: rows.count("succeeded") >= k * n // 5, timeout=120)
                worker = worker_proc(sluice)
                worker.send_signal(signal.SIGKILL)
                worker.wait()
                # The supervisor restarts it (the test waits for the new process).
                sluice.wait_for(lambda w=worker: worker_proc(sluice) is not w, timeout=30)
            done = sluice.wait_batch(batch_id, timeout=300)
            final = rows.all()
    assert done["request_counts"] == {"total": n, "completed": n, "failed": 0}
    out = sluice.lines(done["output_file_id"])
    ids = [x["custom_id"] for x in out]
    assert len(ids) == n and set(ids) == {f"r{i}" for i in range(n)}
    assert {r.status for r in final} == {"succeeded"}
    assert len({r.lease_owner for r in final}) >= 2


def test_job_committed_but_never_published_still_runs(killable_stack: Running) -> None:
    # A crash between the API's commit and its publish: the row exists, no message does.
    sluice = killable_stack
    db = Database(sluice.settings.resolved_database_url)
    try:
        job = create_job(
            db, owner="default", endpoint="/v1/completions", model="sluice-echo",
            body={"model": "sluice-echo", "prompt": "never published", "max_tokens": 4},
        )  # fmt: skip
    finally:
        db.dispose()
    deadline = time.monotonic() + 60
    while True:
        status = sluice.http.get(f"/v1/jobs/{job.batch_id}").json()["status"]
        if status not in ("queued", "running", "in_progress"):
            break
        assert time.monotonic() < deadline, "the unpublished job never ran"
        time.sleep(0.1)
    assert status in ("succeeded", "completed")
