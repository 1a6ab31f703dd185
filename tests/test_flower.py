"""Flower as `sluice up` starts it: behind a login, showing the worker and a running batch task
with its batch id and progress (Celery's custom state PROGRESS, done / total), and pictures of
its workers and tasks pages taken by a headless Chromium (where one is installed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import pytest

from sluice.stack import free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]
SHOTS = Path(__file__).resolve().parent.parent / "bench" / "out"
# SLUICE_TEST_BROWSER names the browser (a path or a command); else the first of these found.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
LINES = 64
CHUNK = 16
WINDOW = (1800, 760)


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A user's shell with the sim engine slowed down, so a batch runs for several seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "FLOWER_"))}
    return {
        **env,
        "SLUICE_DATA_DIR": str(data_dir),
        "SLUICE_ENGINE": "sim",
        # 8 slots, decode steps of 50 ms: a round of 8 requests of 40 tokens takes 2 s.
        "SLUICE_MAX_NUM_SEQS": "8",
        "SLUICE_SIM_DECODE_STEP": "0.05",
        "SLUICE_CHUNK_SIZE": str(CHUNK),
        "SLUICE_AUTH": "off",
        **extra,
    }


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`sluice up` with Flower on a free port; yields its URLs and the printed login line."""
    tmp_path = tmp_path_factory.mktemp("up")
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


def _submit(api: str, lines: int = LINES, max_tokens: int = 20) -> str:
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
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                },
            }
        )
        + "\n"
        for i in range(lines)
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

    (conf,) = [w["conf"] for w in _workers(flower).values()]
    assert (conf["sluice_engine"], conf["sluice_model"], conf["sluice_slots"]) == (
        "sim",
        "sluice-echo",
        8,
    )

    # 40 tokens: each task sits at 8 / 16 for 2 s, and the worker samples progress once a
    # second (worker/celery_app.py), so it cannot jump from 0 to 16 between two samples (with
    # 20 tokens, 1 s rounds, both samples can fall outside that window).
    batch_id = _submit(up["api"], max_tokens=40)
    task = _poll(lambda: _running(flower, batch_id), 30, "a running task with progress")[0]
    assert task["result"]["total"] == CHUNK
    # Arguments: batch id, model, request count; the ids summarised, never a prompt.
    assert "sluice-echo" in task["args"] and str(CHUNK) in task["args"]
    assert "prompt" not in task["args"] + task["kwargs"]
    assert f"{CHUNK} request ids" in task["kwargs"]
    # The tasks page's table (the XHR its script makes) writes that progress as "8 / 16 done";
    # the API above keeps the dict.
    table = flower.get(
        "/tasks/datatable",
        params={"draw": 1, "start": 0, "length": 100, "order[0][column]": 0},
    ).json()["data"]
    row = next(r for r in table if r["uuid"] == task["uuid"])
    assert re.fullmatch(rf"\d+ / {CHUNK} done", str(row["result"])), row
    assert batch_id in row["args"], row

    for t in _poll(lambda: _finished(flower, batch_id, LINES // CHUNK), 60, "the batch's tasks"):
        assert f"'done': {CHUNK}" in t["result"], t["result"]


def test_flower_pages_in_a_headless_browser(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Flower's workers and tasks pages, as a browser draws them, while a batch runs."""
    browser = _browser()
    if isinstance(browser, str):
        pytest.skip(browser)
    up: dict[str, Any] = request.getfixturevalue("up")  # no stack to start when skipped
    user, password = (up["data_dir"] / "flower-auth").read_text().strip().split(":", 1)
    flower = httpx.Client(base_url=up["flower"], timeout=10, auth=(user, password))
    _poll(lambda: _status(flower, "/"), 30, "Flower to listen")
    (worker,) = _workers(flower)
    # 32 requests of 60 decode steps (50 ms) on 8 slots: 4 rounds of 3 s, two tasks of 16;
    # the first one sits at 8 / 16 for about 3 s, long enough for the pictures (2 s each).
    batch_id = _submit(up["api"], lines=2 * CHUNK, max_tokens=60)
    _poll(lambda: _running(flower, batch_id), 30, "a running task with progress")
    login = up["flower"].replace("http://", f"http://{user}:{password}@")
    SHOTS.mkdir(parents=True, exist_ok=True)

    tasks = _shoot(browser, f"{login}/tasks", SHOTS / "flower-tasks.png", tmp_path)
    # The list page (not a login or an empty table) with this batch's tasks and their progress.
    assert "sluice.run_batch" in tasks and batch_id in tasks, tasks[-2000:]
    assert "PROGRESS" in tasks and re.search(rf">\d+ / {CHUNK} done<", tasks), tasks[-2000:]
    workers = _shoot(browser, f"{login}/workers", SHOTS / "flower-workers.png", tmp_path)
    assert worker in workers and "Online" in workers, workers[-2000:]
    page = f"{login}/worker/{quote(worker, safe='')}#tab-config"
    config = _shoot(browser, page, SHOTS / "flower-worker-config.png", tmp_path)
    shown = re.search(r'<div class="([^"]*)" id="tab-config"', config)
    assert shown and {"active", "show"} <= set(shown.group(1).split()), config[-2000:]
    assert all(k in config for k in ("sluice_engine", "sluice_model", "sluice_slots")), config

    # The fixture's `sluice up` stops after this; let the batch end first.
    _poll(lambda: _finished(flower, batch_id, 2), 60, "the pictured batch's tasks")


def _workers(flower: httpx.Client) -> dict[str, Any]:
    """Flower's Sluice workers (those whose config carries the engine), once one reports."""

    def sluice_workers() -> dict[str, Any]:
        data: dict[str, Any] = flower.get("/api/workers", params={"refresh": 1}).json()
        return {k: v for k, v in data.items() if v.get("conf", {}).get("sluice_engine")}

    found: dict[str, Any] = _poll(sluice_workers, 60, "the worker in Flower")
    return found


def _running(flower: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    """The batch's tasks in PROGRESS, part done."""
    tasks = flower.get("/api/tasks", params={"limit": 100}).json().values()
    return [
        t
        for t in tasks
        if t["name"] == "sluice.run_batch"
        and batch_id in (t.get("args") or "")
        and t["state"] == "PROGRESS"
        and 0 < t["result"]["done"] < t["result"]["total"]
    ]


def _finished(flower: httpx.Client, batch_id: str, count: int) -> list[dict[str, Any]]:
    """The batch's tasks once all `count` of them succeeded, else []."""
    tasks = flower.get("/api/tasks", params={"limit": 100}).json().values()
    mine = [t for t in tasks if t["name"] == "sluice.run_batch" and batch_id in t["args"]]
    return mine if len(mine) == count and all(t["state"] == "SUCCESS" for t in mine) else []


def _status(client: httpx.Client, path: str) -> int:
    try:
        return client.get(path).status_code
    except httpx.HTTPError:
        return 0


def _browser() -> Path | str:
    """The headless browser's path, or why there is none (the reason to skip)."""
    wanted = os.environ.get("SLUICE_TEST_BROWSER")
    names = (wanted,) if wanted else BROWSERS
    found = next((p for p in map(shutil.which, names) if p), None)
    if found is None:
        return (
            f"no headless browser ({', '.join(names)} not found; set SLUICE_TEST_BROWSER or "
            "apt-get install chromium): Flower's pages not pictured"
        )
    # A launcher without its browser (Ubuntu's chromium-browser without the snap) fails here.
    try:
        probe = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"headless browser {found} does not start: {exc}"
    if probe.returncode != 0:
        return f"headless browser {found} does not start: {(probe.stderr or probe.stdout)[-300:]}"
    return Path(found)


def _shoot(browser: Path, url: str, png: Path, profile: Path) -> str:
    """Draw `url` (credentials in it) into `png`; return the page's DOM after its scripts ran."""
    png.unlink(missing_ok=True)
    done = subprocess.run(
        [
            str(browser),
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",  # root in a container has no user namespace for the sandbox
            "--hide-scrollbars",
            # Bootstrap then switches tabs without its fade (else caught half-way).
            "--force-prefers-reduced-motion",
            f"--user-data-dir={profile / 'chromium'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            # Virtual time runs until the page's requests settle (the task table is an XHR),
            # 5 s at most.
            "--virtual-time-budget=5000",
            f"--screenshot={png}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    # A PNG of the window's size (IHDR: width and height right after the signature).
    assert struct.unpack(">II", png.read_bytes()[16:24]) == WINDOW
    return done.stdout
