"""Batch lifecycle on a slow (sim) engine: partial results, cancel mid-run, expiry."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from sluice.models import requests
from tests.e2e.conftest import Running, start_stack

MODEL = "sluice-echo"
SLOTS = 4


@pytest.fixture(scope="module")
def sluice(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """Sim engine: 4 slots, 10 ms per token, so 40 requests of 40 tokens take about 4 s."""
    yield from start_stack(
        backend,
        Path(tmp_path_factory.mktemp(f"life-{backend}")),
        SLUICE_ENGINE="sim",
        SLUICE_MAX_NUM_SEQS=str(SLOTS),
        SLUICE_SIM_DECODE_STEP="0.01",
        SLUICE_SIM_DECODE_PER_SEQ="0",
        SLUICE_SIM_PREFILL_PER_TOKEN="0",
        SLUICE_RECONCILE_INTERVAL="0.2",
    )


def submit(sluice: Running, n: int, window: str = "24h") -> str:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"count {i}", "max_tokens": 40},
        }
        for i in range(n)
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = sluice.http.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}
    ).json()
    b = sluice.http.post(
        "/v1/batches",
        json={"input_file_id": f["id"], "completion_window": window, "endpoint": "/v1/completions"},
    )
    assert b.status_code == 200, b.text
    assert b.json()["status"] == "in_progress"
    return str(b.json()["id"])


def wait_results(sluice: Running, batch_id: str, at_least: int) -> list[dict[str, Any]]:
    """Poll the partial-results stream until it holds enough lines."""
    deadline = time.monotonic() + 60
    while True:
        r = sluice.http.get(f"/v1/batches/{batch_id}/results")
        assert r.status_code == 200, r.text
        got = [json.loads(x) for x in r.text.splitlines() if x]
        if len(got) >= at_least:
            return got
        assert time.monotonic() < deadline, "no partial results appeared"
        time.sleep(0.05)


def started(sluice: Running, batch_id: str) -> dict[str, float | None]:
    db = create_engine(sluice.settings.resolved_database_url)
    with db.connect() as conn:
        rows = conn.execute(
            select(requests.c.custom_id, requests.c.started_at).where(
                requests.c.batch_id == batch_id
            )
        ).all()
    db.dispose()
    return {r.custom_id: r.started_at for r in rows}


def test_results_stream_while_running_then_completed(sluice: Running) -> None:
    batch_id = submit(sluice, 12)
    partial = wait_results(sluice, batch_id, 1)
    assert sluice.http.get(f"/v1/batches/{batch_id}").json()["status"] in (
        "in_progress",
        "completed",
    )
    assert all(x["response"]["status_code"] == 200 for x in partial)
    done = sluice.wait_batch(batch_id)
    assert done["status"] == "completed"
    assert done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    assert done["cancelled_at"] is None and done["expired_at"] is None


def test_cancel_mid_run(sluice: Running) -> None:
    n = 40
    batch_id = submit(sluice, n)
    wait_results(sluice, batch_id, 1)
    r = sluice.http.post(f"/v1/batches/{batch_id}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("cancelling", "cancelled")
    assert r.json()["cancelling_at"] is not None
    done = sluice.wait_batch(batch_id)
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    counts = done["request_counts"]
    assert 1 <= counts["completed"] < n
    ok = {x["custom_id"] for x in sluice.lines(done["output_file_id"])}
    errors = sluice.lines(done["error_file_id"])
    dropped = {x["custom_id"] for x in errors}
    # Every request is accounted for once: a kept result or a cancellation line.
    assert ok | dropped == {f"r{i}" for i in range(n)} and not ok & dropped
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    # Queued requests never ran: only those already in flight had started.
    starts = started(sluice, batch_id)
    ran_and_dropped = [c for c in dropped if starts[c] is not None]
    assert len(ran_and_dropped) <= 2 * SLOTS
    assert len(dropped) > 2 * SLOTS


def test_expiry_keeps_finished_results(sluice: Running) -> None:
    n = 40
    batch_id = submit(sluice, n, window="2s")
    done = sluice.wait_batch(batch_id)
    assert done["status"] == "expired" and done["expired_at"] is not None
    ok = {x["custom_id"] for x in sluice.lines(done["output_file_id"])}
    errors = sluice.lines(done["error_file_id"])
    expired = {x["custom_id"] for x in errors}
    assert ok | expired == {f"r{i}" for i in range(n)} and not ok & expired
    assert len(ok) >= 1 and len(expired) >= 1
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}


def test_single_jobs_arriving_together_share_the_engine(sluice: Running) -> None:
    ids = []
    for i in range(2 * SLOTS):
        r = sluice.http.post("/v1/jobs", json={"prompt": f"job {i}", "max_tokens": 20})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    jobs = [sluice.http.get(f"/v1/jobs/{j}", params={"wait": 60}).json() for j in ids]
    assert all(j["status"] == "succeeded" for j in jobs)
    # Results of one engine step share a timestamp: jobs that finished together ran in
    # one engine batch (an engine running one job at a time never finishes two at once).
    finished = Counter(j["timings"]["finished_at"] for j in jobs)
    assert max(finished.values()) >= 2, finished
