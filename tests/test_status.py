"""`sluice status` and GET /v1/admin/status against a real stack; /readyz follows the worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.status import CLEAR
from tests.e2e.conftest import Running, start_stack

ROOT = Path(__file__).resolve().parent.parent
N = 40


@pytest.fixture(scope="module")
def sluice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """API + one echo worker (SQLite, embedded Redis), its client holding the admin key."""
    for running in start_stack("sqlite", tmp_path_factory.mktemp("status")):
        running.http.headers.update(getattr(running.stack, "auth_headers", {}))
        yield running


def _cli(sluice: Running, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "SLUICE_DATA_DIR": str(sluice.settings.data_dir)}
    key = getattr(sluice.stack, "api_key", None)
    if key:
        env["SLUICE_API_KEY"] = key
    argv = [sys.executable, "-m", "sluice.cli", "status", "--url", sluice.stack.url, *args]
    return argv, env


def _run_cli(sluice: Running, *args: str) -> subprocess.CompletedProcess[str]:
    argv, env = _cli(sluice, *args)
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def _lines(model: str, n: int) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}]}}
        for i in range(n)
    ]  # fmt: skip


def _status(sluice: Running) -> dict[str, Any]:
    response = sluice.http.get("/v1/admin/status")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_status_lists_queue_workers_and_batches(sluice: Running) -> None:
    model = sluice.settings.served_model
    batch = sluice.wait_batch(sluice.submit_file(_lines(model, N), "/v1/chat/completions"))
    assert batch["request_counts"]["completed"] == N
    # Worker stats are published every second: wait for the one that counts the batch.
    sluice.wait_for(lambda: _status(sluice)["workers"][0]["completed"] >= N, timeout=30)
    doc = _status(sluice)
    assert doc["models"] == [model]
    assert {(q["model"], q["priority"]) for q in doc["queue"]} == {
        (model, "interactive"), (model, "bulk"),
    }  # fmt: skip
    assert all(q["queued"] == 0 and q["running"] == 0 for q in doc["queue"])
    (worker,) = doc["workers"]
    assert worker["model"] == model and worker["engine"] == "echo"
    assert worker["live"] and worker["state"] == "running"
    assert 0 <= worker["last_seen_seconds"] < 5
    assert worker["slots"] > 0
    listed = {b["id"]: b for b in doc["batches"]}
    assert listed[batch["id"]]["completed"] == N and listed[batch["id"]]["status"] == "completed"
    assert doc["throughput"]["requests_per_second"] >= 0

    shown = _run_cli(sluice)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for heading in ("throughput:", "QUEUE", "WORKERS", "BATCHES"):
        assert heading in text
    worker_row = next(line for line in text.splitlines() if line.startswith(worker["owner"]))
    assert model in worker_row and "echo" in worker_row and "live" in worker_row
    assert batch["id"] in text and "Traceback" not in shown.stderr

    as_json = _run_cli(sluice, "--json", "--batches", "3")
    assert as_json.returncode == 0, as_json.stderr
    parsed = json.loads(as_json.stdout)
    assert parsed["object"] == "sluice.status" and parsed["workers"][0]["owner"] == worker["owner"]
    assert len(parsed["batches"]) <= 3


def test_status_watch_refreshes_until_ctrl_c(sluice: Running) -> None:
    argv, env = _cli(sluice, "--watch", "0.2")
    proc = subprocess.Popen(
        argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: out.extend(iter(stdout.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while "".join(out).count(CLEAR) < 3:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "fewer than 3 refreshes in 30 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr
    assert "WORKERS" in "".join(out)


def test_status_of_an_api_that_is_not_there(sluice: Running) -> None:
    env = {**os.environ, "SLUICE_DATA_DIR": str(sluice.settings.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "status", "--url", "http://127.0.0.1:1"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot reach the API at http://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr


def test_readyz_follows_the_worker(sluice: Running) -> None:
    # Last in this module: it stops the stack's worker.
    ready = sluice.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"] == "ok"
    (worker,) = [c for c in sluice.stack.children if c.name == "worker"]
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0
    # Its last stats say "stopped": not ready at once, not after its key expires (30 s).
    ready = sluice.http.get("/readyz")
    assert ready.status_code == 503, ready.text
    body = ready.json()
    model = sluice.settings.served_model
    assert body["down"] == ["workers"]
    assert body["checks"]["database"] == "ok" and body["checks"]["redis"] == "ok"
    assert f"no live worker serves {model!r}" in body["error"]["message"]
    assert str(sluice.settings.data_dir) not in ready.text  # no paths, no driver text
    assert sluice.http.get("/healthz").status_code == 200  # liveness is unchanged
    (stopped,) = _status(sluice)["workers"]
    assert stopped["state"] == "stopped" and not stopped["live"]
