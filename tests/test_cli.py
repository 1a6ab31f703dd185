"""The `sluice` command as a user runs it: up (and a clean stop), run, batches, bad settings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from sluice.config import load_settings
from sluice.redis_server import shutdown_embedded
from sluice.stack import free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no database or Redis configured, so the embedded defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {**env, "SLUICE_DATA_DIR": str(data_dir), "SLUICE_ENGINE": "echo", **extra}


def _auth(data_dir: Path) -> dict[str, str]:
    """The header with the local admin key `sluice up` wrote to its data directory."""
    return {"Authorization": f"Bearer {(data_dir / 'api-key').read_text().strip()}"}


def test_up_serves_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*SLUICE, "up", "--port", str(port)],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # The children's logs share stdout; the URL line comes once the API is ready.
        for line in proc.stdout:
            if "Sluice is up at" in line:
                break
        url = re.search(r"http://\S+", line)
        assert url and url.group(0) == f"http://127.0.0.1:{port}", line
        # Auth is on and `sluice up` said where its local admin key is (only we may read it).
        for key_line in proc.stdout:  # the children's logs may come in between
            if "API keys" in key_line:
                break
        assert "API keys are on" in key_line and str(tmp_path / "api-key") in key_line
        assert (tmp_path / "api-key").stat().st_mode & 0o777 == 0o600
        assert httpx.get(f"{url.group(0)}/v1/files").status_code == 401
        http = httpx.Client(base_url=url.group(0), timeout=30, headers=_auth(tmp_path))
        job = http.post("/v1/jobs", json={"prompt": "up and running", "max_tokens": 8})
        done = http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30}).json()
        assert done["output"] == "up and running"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # api, worker, redis-server
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        _gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def test_up_restarts_a_killed_worker_and_keeps_the_api(tmp_path: Path) -> None:
    port = free_port()
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            [*SLUICE, "up", "--port", str(port)],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "Sluice is up at" in line:
                break
        # Keep reading: the children share this pipe and must never block on it.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        workers = [c for c in psutil.Process(proc.pid).children() if "worker" in c.cmdline()]
        assert len(workers) == 1
        workers[0].kill()
        # The supervisor says what happened, and starts another worker.
        deadline = time.monotonic() + 30
        while "sluice worker was killed by signal 9" not in errors.read_text():
            assert time.monotonic() < deadline, errors.read_text()[-2000:]
            time.sleep(0.1)
        assert "restarting it" in errors.read_text()
        assert proc.poll() is None
        # The API never went away, and the new worker serves.
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", timeout=30, headers=_auth(tmp_path)
        )
        job = http.post("/v1/jobs", json={"prompt": "after the crash", "max_tokens": 8})
        assert job.status_code == 202, job.text
        done = http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 60}).json()
        assert done["output"] == "after the crash"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()


def test_run_converts_plain_lines_and_writes_results(tmp_path: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text(
        "".join(
            json.dumps(x) + "\n"
            for x in [
                {"prompt": "first plain prompt", "max_tokens": 3},
                {"prompt": "second plain prompt", "max_tokens": 3},
            ]
        )
    )
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [*SLUICE, "run", str(src), "-o", str(out)],
        env=_env(tmp_path / "d"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in lines} == {
        "line-1": "first plain prompt",
        "line-2": "second plain prompt",
    }


def test_run_gives_up_on_a_worker_that_never_loads(tmp_path: Path) -> None:
    # A stuck model download must not hang a script's `sluice run`: after
    # SLUICE_WORKER_START_TIMEOUT it says why, exits 1 and leaves nothing running.
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "never answered", "max_tokens": 3}) + "\n")
    env = _env(tmp_path / "d", SLUICE_FAULTS="load-hang=1", SLUICE_WORKER_START_TIMEOUT="4")
    with open(tmp_path / "run.err", "w") as err:
        proc = subprocess.Popen(
            [*SLUICE, "run", str(src), "-o", str(tmp_path / "out.jsonl")], env=env, stderr=err
        )
    try:
        family = _children_once_started(proc, "worker")
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    said = (tmp_path / "run.err").read_text()
    assert "sluice: the worker did not load sluice-echo in 4s (SLUICE_WORKER_START_TIMEOUT" in said
    assert "Traceback" not in said, said[-3000:]
    _gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {alive}"


def test_run_exits_nonzero_when_a_request_fails(tmp_path: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    src.write_text(
        json.dumps({"messages": [{"role": "user", "content": "fits"}], "max_tokens": 2})
        + "\n"
        + json.dumps({"prompt": "far " * 100, "max_tokens": 2})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    done = subprocess.run(
        [*SLUICE, "run", str(src), "-o", str(out)],
        env=_env(tmp_path / "d", SLUICE_MAX_MODEL_LEN="32"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    # Mixed endpoints in one file are refused up front, naming the problem.
    assert done.returncode == 1
    assert "mixes" in done.stderr
    src.write_text(
        json.dumps({"prompt": "fits", "max_tokens": 2})
        + "\n"
        + json.dumps({"prompt": "far " * 100, "max_tokens": 2})
        + "\n"
    )
    done = subprocess.run(
        [*SLUICE, "run", str(src), "-o", str(out)],
        env=_env(tmp_path / "d", SLUICE_MAX_MODEL_LEN="32"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert lines["line-1"]["response"]["status_code"] == 200
    assert lines["line-2"]["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_bad_setting_fails_at_start_naming_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [*SLUICE, "db", "upgrade"],
        env=_env(tmp_path, SLUICE_MAX_NUM_SEQS="lots"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "SLUICE_MAX_NUM_SEQS" in done.stderr


def test_batches_commands_against_a_running_sluice(tmp_path: Path) -> None:
    from sluice.config import load_settings
    from sluice.stack import Stack

    env = _env(tmp_path)
    stack = Stack(
        load_settings(data_dir=tmp_path),
        "127.0.0.1",
        free_port(),
        quiet=True,
        env={"SLUICE_ENGINE": "echo"},
    )
    try:
        stack.start()
        src = tmp_path / "in.jsonl"
        src.write_text(json.dumps({"prompt": "listed later", "max_tokens": 2}) + "\n")
        run = subprocess.run(
            [*SLUICE, "run", str(src), "-o", str(tmp_path / "o.jsonl"), "--url", stack.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        listed = subprocess.run(
            [*SLUICE, "batches", "list", "--url", stack.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        batch_id = listed.stdout.split()[0]
        assert batch_id.startswith("batch_") and "completed" in listed.stdout
        got = subprocess.run(
            [*SLUICE, "batches", "get", batch_id, "--url", stack.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(got.stdout)["request_counts"]["completed"] == 1
        results = subprocess.run(
            [*SLUICE, "batches", "results", batch_id, "--url", stack.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        line = json.loads(results.stdout)
        assert line["response"]["body"]["choices"][0]["text"] == "listed later"
        cancel = subprocess.run(
            [*SLUICE, "batches", "cancel", batch_id, "--url", stack.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cancel.returncode == 1 and "409" in cancel.stderr
    finally:
        stack.stop()


def _start_up(tmp_path: Path, port: int, **env: str) -> tuple[subprocess.Popen[str], Path]:
    """`sluice up` in its own process group, as a terminal runs it; stderr to a file."""
    errors = tmp_path / f"up-{port}.err"
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            [*SLUICE, "up", "--port", str(port)], env=_env(tmp_path, **env), stdout=subprocess.PIPE,
            stderr=err, text=True, start_new_session=True,
        )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Sluice is up at" in line:
            break
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, errors


def test_ctrl_c_stops_everything_without_tracebacks(tmp_path: Path) -> None:
    proc, errors = _start_up(tmp_path, free_port())
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 3
        # A terminal's Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            still = [" ".join(p.cmdline()[:4]) for p in family if p.is_running()]
            raise AssertionError(
                f"sluice up still running 60 s after Ctrl-C; children alive: {still}\n"
                + errors.read_text()[-3000:]
            ) from None
        assert code == 0
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running: {alive}"
        said = errors.read_text()
        assert "Traceback" not in said and "did not stop" not in said, said[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_with_a_long_poll_open_stops_within_the_grace(tmp_path: Path) -> None:
    # An open long poll (or stream) must not hold the API past the shutdown grace: uvicorn
    # would wait for it (up to its 60 s), and sluice up would have to kill the API.
    port = free_port()
    slow = {"SLUICE_ENGINE": "sim", "SLUICE_SIM_DECODE_STEP": "0.05", "SLUICE_SHUTDOWN_GRACE": "2"}
    proc, errors = _start_up(tmp_path, port, **slow)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=_auth(tmp_path))
        job = http.post("/v1/jobs", json={"prompt": "slow", "max_tokens": 4000}).json()
        answers: list[httpx.Response] = []
        polling = threading.Thread(
            target=lambda: answers.append(http.get(f"/v1/jobs/{job['id']}?wait=60", timeout=90))
        )
        polling.start()
        _wait_for_open_polls(http, 1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        polling.join(30)
        # The poll was told to come back (the job is still queued: nothing accepted is lost).
        assert answers and answers[0].status_code == 503 and answers[0].headers["retry-after"]
        said = errors.read_text()
        assert "did not stop" not in said and "Traceback" not in said, said[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_open_polls(http: httpx.Client, count: int) -> None:
    """Until the API's /metrics counts `count` long polls open."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if f"sluice_api_waiting {count}.0" in http.get("/metrics").text:
            return
        time.sleep(0.05)
    raise AssertionError(f"the API never had {count} long polls open")


def test_ctrl_c_during_start_up_stops_everything_without_tracebacks(tmp_path: Path) -> None:
    # Ctrl-C while the children are still importing: only `sluice up` gets it (they run in
    # sessions of their own), and it stops each of them once, in order.
    errors = tmp_path / "up.err"
    with open(errors, "w") as err:
        proc = subprocess.Popen(
            [*SLUICE, "up", "--port", str(free_port())], env=_env(tmp_path),
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
    try:
        family = _children_once_started(proc, "worker")
        # The terminal's process group holds `sluice up` alone.
        assert _in_own_sessions(proc, family)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running: {alive}"
        assert "Traceback" not in errors.read_text(), errors.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_children_die_with_a_killed_up(tmp_path: Path) -> None:
    # SIGKILL gives `sluice up` no chance to stop anything: its children, in sessions of their
    # own, must not run on without their supervisor (the embedded redis-server stays: the
    # next `sluice up` reuses it).
    proc, _errors = _start_up(tmp_path, free_port())
    family = [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "sluice.cli" in c.cmdline()
    ]
    assert {c.cmdline()[3] for c in family} >= {"api", "worker", "webhooks"}
    proc.kill()
    proc.wait(30)
    _gone, alive = psutil.wait_procs(family, timeout=60)
    for straggler in alive:
        straggler.kill()
    # The embedded redis-server did stay, as documented; stop it (nothing else would).
    assert shutdown_embedded(load_settings(data_dir=tmp_path, redis_url=None))
    assert not alive, f"left running without their supervisor: {alive}"


def _in_own_sessions(proc: subprocess.Popen[Any], family: list[psutil.Process]) -> bool:
    """Whether every child runs in a session other than `sluice up`'s. A child caught between
    fork and its setsid() (the next one being started) is given 5 s to get there."""
    deadline = time.monotonic() + 5
    while True:
        shared = []
        for child in family:
            with contextlib.suppress(ProcessLookupError):
                if os.getsid(child.pid) == os.getsid(proc.pid):
                    shared.append(child)
        if not shared or time.monotonic() > deadline:
            return not shared
        time.sleep(0.01)


def _children_once_started(proc: subprocess.Popen[Any], command: str) -> list[psutil.Process]:
    """`sluice up`'s children, as soon as it has started `sluice COMMAND`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"it exited with code {proc.returncode} first")
        family = psutil.Process(proc.pid).children(recursive=True)
        if any(command in c.cmdline() for c in family if c.is_running()):
            return family
        time.sleep(0.01)
    raise AssertionError(f"sluice up did not start {command} in 60 s")


def test_a_second_up_on_a_busy_port_or_data_dir_says_so(tmp_path: Path) -> None:
    port = free_port()
    proc, _errors = _start_up(tmp_path, port)
    try:
        # Same port, another data directory: one clear line, exit 1, nothing started.
        other = tmp_path / "other"
        busy = subprocess.run(
            [*SLUICE, "up", "--port", str(port)], env=_env(other), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert busy.returncode == 1
        assert busy.stderr.strip().splitlines() == [
            f"sluice up: 127.0.0.1:{port} is already in use (another Sluice?); "
            "choose another with --port"
        ], busy.stderr
        assert "Sluice is up" not in busy.stdout
        # Same data directory, another port: the lock names the holder.
        shared = subprocess.run(
            [*SLUICE, "up", "--port", str(free_port())], env=_env(tmp_path), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert shared.returncode == 1
        assert f"in use by another sluice up (pid {proc.pid})" in shared.stderr, shared.stderr
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
