"""A worker killed mid-run loses nothing: leases expire, work is republished, results once."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from sluice.models import requests
from tests.e2e.conftest import Running, start_stack

N = 40


@pytest.fixture
def sluice(backend: str, tmp_path: Path) -> Iterator[Running]:
    """Sim engine (slow enough to kill mid-run), short leases, eager reconciler."""
    yield from start_stack(
        backend,
        tmp_path,
        SLUICE_ENGINE="sim",
        SLUICE_MAX_NUM_SEQS="4",
        SLUICE_SIM_DECODE_STEP="0.01",
        SLUICE_SIM_DECODE_PER_SEQ="0",
        SLUICE_LEASE_SECONDS="1.5",
        SLUICE_RECONCILE_INTERVAL="0.2",
    )


def test_killed_worker_work_is_finished_once_by_another(sluice: Running) -> None:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "sluice-echo", "prompt": f"n {i}", "max_tokens": 30},
        }
        for i in range(N)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = sluice.http.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}
    ).json()
    batch_id = sluice.http.post(
        "/v1/batches",
        json={"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
    ).json()["id"]
    db = create_engine(sluice.settings.resolved_database_url)

    def count(status: str) -> int:
        with db.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        requests.c.batch_id == batch_id, requests.c.status == status
                    )
                ).scalar_one()
            )

    # Wait until the first worker has finished some and holds others in flight, then kill it.
    first = sluice.stack.procs[1]
    sluice.wait_for(lambda: count("succeeded") >= 4 and count("running") >= 1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    held = count("running")
    assert held >= 1
    sluice.stack.spawn("worker")
    done = sluice.wait_batch(batch_id)
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": N, "completed": N, "failed": 0}
    out = sluice.lines(done["output_file_id"])
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(N))
    with db.connect() as conn:
        attempts = conn.execute(
            select(requests.c.attempts, requests.c.lease_owner).where(
                requests.c.batch_id == batch_id
            )
        ).all()
    db.dispose()
    # The requests the dead worker held ran a second time; nothing ran a third time.
    assert sum(1 for a in attempts if a.attempts == 2) >= held
    assert max(a.attempts for a in attempts) == 2
    assert len({a.lease_owner for a in attempts}) == 2
