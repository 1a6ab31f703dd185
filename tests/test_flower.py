"""Flower as `sluice up` starts it: behind a login, showing the worker and a running batch task
with its batch id and progress (Celery's custom state PROGRESS, done / total)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from sluice.stack import free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]
DOCS = Path(__file__).resolve().parent.parent / "docs"
LINES = 64
CHUNK = 16


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A user's shell with the sim engine slowed down, so a batch runs for several seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "FLOWER_"))}
    return {
        **env,
        "SLUICE_DATA_DIR": str(data_dir),
        "SLUICE_ENGINE": "sim",
        # 8 slots, 20 decode steps of 50 ms per request: 64 requests take about 8 s.
        "SLUICE_MAX_NUM_SEQS": "8",
        "SLUICE_SIM_DECODE_STEP": "0.05",
        "SLUICE_CHUNK_SIZE": str(CHUNK),
        "SLUICE_AUTH": "off",
        **extra,
    }


@pytest.fixture
def up(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`sluice up` with Flower on a free port; yields its URLs and the printed login line."""
    port, flower_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*SLUICE, "up", "--port", str(port)],
        env=_env(tmp_path, SLUICE_FLOWER_PORT=str(flower_port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        flower_line, said = "", []
        for line in proc.stdout:
            said.append(line)
            if line.startswith("Flower at"):
                flower_line = line.strip()
                break
        assert flower_line, "sluice up printed no Flower line"
        yield {
            "api": f"http://127.0.0.1:{port}",
            "flower": f"http://127.0.0.1:{flower_port}",
            "line": flower_line,
            "said": "".join(said),
            "data_dir": tmp_path,
        }
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        _gone, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()


def _submit(api: str) -> str:
    http = httpx.Client(base_url=api, timeout=30, headers={"Authorization": "Bearer sluice"})
    body = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": "sluice-echo",
                    "prompt": f"prompt {i}",
                    "max_tokens": 20,
                    "ignore_eos": True,
                },
            }
        )
        + "\n"
        for i in range(LINES)
    )
    f = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", body)})
    assert f.status_code == 200, f.text
    b = http.post(
        "/v1/batches",
        json={
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/completions",
            "completion_window": "24h",
        },
    )
    assert b.status_code == 200, b.text
    return str(b.json()["id"])


def _poll(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def test_flower_shows_worker_and_running_batch_with_progress(up: dict[str, Any]) -> None:
    # The login is generated, stored 0600 in the data dir and printed once; loopback only.
    auth_file = up["data_dir"] / "flower-auth"
    assert auth_file.stat().st_mode & 0o777 == 0o600
    user, password = auth_file.read_text().strip().split(":", 1)
    assert f"user {user}, password {password}" in up["line"], up["line"]
    assert up["line"].startswith(f"Flower at {up['flower']} ")
    # A calm first run: the engine and model are named, and how to serve a real one.
    assert "engine sim, model sluice-echo" in up["said"]
    assert "Note: the sim engine echoes prompts" in up["said"] and "SLUICE_ENGINE=hf" in up["said"]

    flower = httpx.Client(base_url=up["flower"], timeout=10)
    _poll(lambda: _status(flower, "/"), 30, "Flower to listen")
    assert flower.get("/api/workers").status_code == 401
    assert flower.get("/", auth=(user, "wrong")).status_code == 401
    assert flower.get("/api/tasks", auth=(user, password + "x")).status_code == 401
    flower.auth = (user, password)

    def workers() -> dict[str, Any]:
        data: dict[str, Any] = flower.get("/api/workers", params={"refresh": 1}).json()
        return {k: v for k, v in data.items() if v.get("conf", {}).get("sluice_engine")}

    found = _poll(workers, 60, "the worker in Flower")
    (conf,) = [w["conf"] for w in found.values()]
    assert (conf["sluice_engine"], conf["sluice_model"], conf["sluice_slots"]) == (
        "sim",
        "sluice-echo",
        8,
    )

    batch_id = _submit(up["api"])

    def running() -> list[dict[str, Any]]:
        tasks = flower.get("/api/tasks", params={"limit": 100}).json().values()
        return [
            t
            for t in tasks
            if t["name"] == "sluice.run_batch"
            and batch_id in (t.get("args") or "")
            and t["state"] == "PROGRESS"
            and 0 < t["result"]["done"] < t["result"]["total"]
        ]

    task = _poll(running, 30, "a running task with progress")[0]
    assert task["result"]["total"] == CHUNK
    # Arguments: batch id, model, request count; the ids summarised, never a prompt.
    assert "sluice-echo" in task["args"] and str(CHUNK) in task["args"]
    assert "prompt" not in task["args"] + task["kwargs"]
    assert f"{CHUNK} request ids" in task["kwargs"]
    _screenshot(up["flower"], user, password)

    def finished() -> list[dict[str, Any]]:
        tasks = flower.get("/api/tasks", params={"limit": 100}).json().values()
        mine = [t for t in tasks if t["name"] == "sluice.run_batch" and batch_id in t["args"]]
        return (
            mine
            if len(mine) == LINES // CHUNK and all(t["state"] == "SUCCESS" for t in mine)
            else []
        )

    for t in _poll(finished, 60, "every task of the batch to succeed"):
        assert f"'done': {CHUNK}" in t["result"], t["result"]


def _status(client: httpx.Client, path: str) -> int:
    try:
        return client.get(path).status_code
    except httpx.HTTPError:
        return 0


def _screenshot(url: str, user: str, password: str) -> None:
    """Flower's task list as a picture for docs/ (only where a headless browser exists)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        return
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch()
            page = browser.new_page(
                http_credentials={"username": user, "password": password},
                viewport={"width": 1400, "height": 700},
            )
            page.goto(f"{url}/tasks", wait_until="networkidle")
            page.wait_for_selector("text=PROGRESS", timeout=5000)
            page.screenshot(path=str(DOCS / "flower-tasks.png"))
            browser.close()
    except Error as exc:  # no browser downloaded: the picture is optional, the test is not
        print("no screenshot:", " ".join(str(exc).split())[:200])
