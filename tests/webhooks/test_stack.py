"""`sluice up`'s stack runs the webhook sender: a job's event reaches a receiver, signed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from standardwebhooks import Webhook

from sluice.migrate import upgrade
from tests.e2e.conftest import start_stack
from tests.webhooks.receivers import receiver
from tests.webhooks.test_delivery import SECRET

H = {"Authorization": "Bearer local"}


def test_the_stack_delivers_job_events(tmp_path: Path) -> None:
    env = {
        "SLUICE_AUTH": "off",
        "SLUICE_WEBHOOK_SECRET": SECRET,
        "SLUICE_WEBHOOK_ALLOWLIST": "127.0.0.0/8",
        "SLUICE_WEBHOOK_POLL": "0.1",
    }
    with receiver() as rec:
        stack = start_stack("sqlite", tmp_path, **env)
        run = next(stack)
        try:
            assert "webhooks" in run.stack.names
            body = {"prompt": "stack says hi", "max_tokens": 3, "webhook_url": rec.url}
            r = run.http.post("/v1/jobs", json=body, headers=H)
            assert r.status_code == 202, r.text
            [call] = rec.wait_calls(1, timeout=60)
            event = Webhook(SECRET).verify(call.body, call.headers)
            assert event["type"] == "job.completed"
            assert event["data"]["job"]["output"] == "stack says hi"
        finally:
            stack.close()


def test_sluice_webhooks_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The process `sluice up` supervises: SIGTERM ends it with exit code 0."""
    db_url = f"sqlite:///{tmp_path / 'sluice.db'}"
    upgrade(db_url)
    env = {**os.environ, "SLUICE_DATABASE_URL": db_url, "SLUICE_DATA_DIR": str(tmp_path),
           "SLUICE_WEBHOOK_SECRET": SECRET}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "webhooks"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out = b""
        assert proc.stdout is not None
        while b"webhook sender" not in out:  # its start line (a deadline: pytest-timeout)
            line = proc.stdout.readline()
            assert line, out.decode()
            out += line
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out + rest).decode()
        assert b"Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
