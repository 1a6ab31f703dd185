"""vLLM's engine core killed mid-run: the worker exits non-zero in bounded time, its rows go
back to the queue, no vLLM process is left behind, and the restarted worker finishes the file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import create_engine, func, select

from sluice.models import requests
from tests.e2e.conftest import Running, start_stack
from tests.faults.conftest import supervised
from tests.vllm.test_stack import env
from worker.runner import EXIT_RUNNER_FAILED

N = 40


@pytest.fixture(scope="module")
def sluice(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """SQLite + embedded Redis; the vLLM worker is supervised (restarted when it exits)."""
    yield from start_stack(
        "sqlite",
        tmp_path_factory.mktemp("vllm-crash") / "data",
        SLUICE_ENGINE="vllm",
        SLUICE_INFLIGHT_FACTOR="8",
        SLUICE_RECONCILE_INTERVAL="0.5",
        **env(tiny_model),
    )


def count(url: str, batch_id: str, status: str) -> int:
    """Requests of the batch in this status, read from the database."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        requests.c.batch_id == batch_id, requests.c.status == status
                    )
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_engine_core_killed_mid_run(sluice: Running) -> None:
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": f"Request number {i} says", "max_tokens": 48,
                  "temperature": 0, "ignore_eos": True}}
        for i in range(N)
    ]  # fmt: skip
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = sluice.http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("c.jsonl", data)})
    batch = sluice.http.post(
        "/v1/batches",
        json={"input_file_id": f.json()["id"], "endpoint": "/v1/completions",
              "completion_window": "24h"},
    ).json()  # fmt: skip
    url = sluice.settings.resolved_database_url
    with supervised(sluice):
        worker = sluice.stack.procs[sluice.stack.names.index("worker")]
        sluice.wait_for(lambda: count(url, batch["id"], "succeeded") >= 2, timeout=120)
        engine_procs = psutil.Process(worker.pid).children(recursive=True)
        assert engine_procs, "vLLM's engine core runs in child processes of the worker"
        for p in engine_procs:
            p.kill()
        killed_at = time.monotonic()
        # The runner sees the dead engine, releases its rows and exits 70, in bounded time.
        sluice.wait_for(lambda: worker.poll() is not None, timeout=60)
        assert worker.returncode == EXIT_RUNNER_FAILED
        assert time.monotonic() - killed_at < 60
        assert count(url, batch["id"], "running") == 0
        done = sluice.wait_batch(batch["id"], timeout=300)
    assert done["request_counts"] == {"total": N, "completed": N, "failed": 0}
    out = sluice.lines(done["output_file_id"])
    assert sorted(x["custom_id"] for x in out) == sorted(f"c{i}" for i in range(N))
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 48 for x in out)
    # Nothing of the first worker's vLLM survives it.
    alive = [p for p in engine_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
