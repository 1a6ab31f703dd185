"""`sluice run` as a user runs it in a terminal: a bar to 100% with counts, a file over the
line limit split and joined back in input order, refused files summarised, and a server that
goes away answered with one message and a resume that finishes the run."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sluice.stack import free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]
# The server's line limit in these tests: 100 lines travel as 3 batches.
MAX_LINES = "40"


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return {
        **env,
        "SLUICE_DATA_DIR": str(data_dir),
        "SLUICE_ENGINE": "echo",
        "SLUICE_MAX_FILE_LINES": MAX_LINES,
        "SLUICE_FLOWER": "false",
        "SLUICE_AUTH": "off",
        # Auth is off on these servers; the client still sends a key, as every client does.
        "SLUICE_API_KEY": "sluice",
        **extra,
    }


class Up:
    """A `sluice up` in its own process group (so a test can take the whole server away)."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        self.proc = subprocess.Popen(
            [*SLUICE, "up", "--port", str(port)],
            env=_env(data_dir, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "Sluice is up at" in line:
                return
        raise AssertionError("sluice up never came up")

    def kill(self) -> None:
        """Every process of the stack, at once (a server that goes away)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
            psutil.wait_procs(children, timeout=30)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    server = Up(tmp_path / "server", free_port(), SLUICE_MAX_MODEL_LEN="64")
    try:
        yield server
    finally:
        server.stop()


def _in_pty(args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run a command on a pseudo-terminal (as in a shell); (exit code, everything it drew)."""
    master, slave = pty.openpty()
    # A terminal 120 columns wide, as a shell window would be.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(args, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def _read(fd: int) -> bytes:
    """What the terminal has; b"" once the child closed it (Linux says EIO)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _prompts(path: Path, n: int, bad: int | None = None, max_tokens: int = 4) -> Path:
    with path.open("w") as fh:
        for i in range(1, n + 1):
            line: dict[str, Any] = {"prompt": f"prompt number {i}", "max_tokens": max_tokens}
            if i == bad:
                line["prompt"] = "long " * 200  # over the server's context: fails in the worker
            fh.write(json.dumps(line) + "\n")
    return path


def test_bar_reaches_100_percent_and_a_long_file_comes_back_in_order(
    up: Up, tmp_path: Path
) -> None:
    src, out = _prompts(tmp_path / "prompts.jsonl", 100), tmp_path / "out.jsonl"
    code, screen = _in_pty(
        [*SLUICE, "run", str(src), "-o", str(out), "--url", up.url], _env(tmp_path / "client")
    )
    assert code == 0, screen
    assert "3 batches" in screen
    # The bar's last frame: 100%, every request counted, the rate and the ETA fields drawn.
    last = screen.replace("\r", "\n").strip().splitlines()
    frames = [f for f in last if "100%" in f]
    assert frames and "100/100" in frames[-1] and "ok 100, failed 0" in frames[-1], screen
    assert "tok/s" in frames[-1] and "<" in frames[-1]  # tqdm's "elapsed<remaining"
    assert "completed: 100 succeeded, 0 failed of 100" in screen
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"line-{i}" for i in range(1, 101)]
    # The model was the server's (nothing in the file named one).
    assert {x["response"]["body"]["model"] for x in lines} == {"sluice-echo"}


def test_refused_and_failed_lines_are_summarised_once(up: Up, tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"c{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"model": "nope", "prompt": "x", "max_tokens": 4},
                }
            )
            + "\n"
            for i in range(1, 9)
        )
    )
    code, screen = _in_pty(
        [*SLUICE, "run", str(src), "-o", str(tmp_path / "o.jsonl"), "--url", up.url],
        _env(tmp_path / "client"),
    )
    assert code == 1
    assert "8 problem(s) (model_not_found 8)" in screen, screen
    assert re.search(r"line 1: model 'nope'", screen)
    assert not re.search(r"line (\d+): line \1", screen), screen
    assert "... and 3 more" in screen
    # Failures at run time: counted by code after the run, the output keeps every line.
    out = tmp_path / "o2.jsonl"
    code, screen = _in_pty(
        [
            *SLUICE,
            "run",
            str(_prompts(tmp_path / "p.jsonl", 10, bad=4)),
            "-o",
            str(out),
            "--url",
            up.url,
        ],
        _env(tmp_path / "client"),
    )
    assert code == 1
    assert "9 succeeded, 1 failed of 10" in screen, screen
    assert re.search(r"failures by code: \w+ 1", screen), screen
    assert len(out.read_text().splitlines()) == 10


def test_server_gone_says_how_to_resume_and_resume_finishes(tmp_path: Path) -> None:
    port = free_port()
    # Short leases: rows the killed worker held go back to the queue 5 s after it died.
    slow = {
        "SLUICE_ENGINE": "sim",
        "SLUICE_MAX_NUM_SEQS": "4",
        "SLUICE_SIM_DECODE_STEP": "0.05",
        "SLUICE_LEASE_SECONDS": "5",
        "SLUICE_RECONCILE_INTERVAL": "1",
    }
    server = Up(tmp_path / "server", port, **slow)
    # 60 requests of 40 tokens on 4 slots at 50 ms a step: about 30 s of work.
    src, out = _prompts(tmp_path / "p.jsonl", 60, max_tokens=40), tmp_path / "out.jsonl"
    client_env = _env(tmp_path / "client")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [*SLUICE, "run", str(src), "-o", str(out), "--url", server.url],
        env=client_env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        # Mid-run: some requests done, the bar drawing.
        while not re.search(rb"ok [1-9]", seen) and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += _read(master)
            if proc.poll() is not None:
                break
        server.kill()  # mid-run: the bar is drawing
        code = proc.wait(60)
        while select.select([master], [], [], 0.2)[0] and (more := _read(master)):
            seen += more
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        server.kill()
    text = seen.decode("utf-8", "replace")
    assert code == 3, repr(text)
    assert text.count("lost the server at") == 1 and "Traceback" not in text, text
    run_id = re.search(r"sluice run --resume (batch_\w+)", text)
    assert run_id, text
    server = Up(tmp_path / "server", port, **slow)
    try:
        code, screen = _in_pty(
            [*SLUICE, "run", "--resume", run_id.group(1), "-o", str(out), "--url", server.url],
            client_env,
        )
        assert code == 0, screen
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x["custom_id"] for x in lines] == [f"line-{i}" for i in range(1, 61)]
    finally:
        server.stop()


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    slow = {"SLUICE_ENGINE": "sim", "SLUICE_MAX_NUM_SEQS": "2", "SLUICE_SIM_DECODE_STEP": "0.05"}
    server = Up(tmp_path / "server", free_port(), **slow)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            *SLUICE,
            "run",
            str(_prompts(tmp_path / "p.jsonl", 20, max_tokens=40)),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--url",
            server.url,
        ],
        env=_env(tmp_path / "client"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"sluice run:" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += _read(master)
        proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C
        code = proc.wait(30)
        while select.select([master], [], [], 0.2)[0] and (more := _read(master)):
            seen += more
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        server.stop()
    text = seen.decode("utf-8", "replace")
    assert code == 130, repr(text)
    assert re.search(r"Resume with:\s+sluice run --resume batch_\w+ -o ", text), repr(text)
    assert "Traceback" not in text
