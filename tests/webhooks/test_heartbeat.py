"""`sluice healthcheck webhooks`: healthy only while the sender's heartbeat is fresh."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sluice.config import load_settings
from sluice.healthcheck import HEARTBEAT_SLACK, sender_heartbeat, touch_sender_heartbeat


def _check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SLUICE_DATA_DIR": str(data_dir)}
    cmd = [sys.executable, "-m", "sluice.cli", "healthcheck", "webhooks"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_healthcheck_follows_the_heartbeat(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    never = _check(tmp_path)
    assert never.returncode == 1 and "no webhook sender has started" in never.stderr
    touch_sender_heartbeat(settings)
    fresh = _check(tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    stale = time.time() - settings.webhook_poll - HEARTBEAT_SLACK - 5
    os.utime(sender_heartbeat(settings), (stale, stale))
    old = _check(tmp_path)
    assert old.returncode == 1 and "last looped" in old.stderr
