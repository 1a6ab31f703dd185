"""A calm first run: one clear line for an engine that cannot start here, before anything runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sluice.stack import free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run(
        [*SLUICE, *args],
        env={**base, "SLUICE_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_engine_package_is_one_line(tmp_path: Path) -> None:
    for cmd in (["up", "--port", str(free_port())], ["worker"]):
        out = _run(tmp_path, *cmd, SLUICE_ENGINE="vllm")
        assert out.returncode != 0
        assert out.stderr.strip().splitlines() == [
            f"sluice {cmd[0]}: the vllm engine needs vllm, which is not installed: "
            "pip install 'sluice[vllm]'"
        ], out.stderr
    # Nothing was started: no embedded Redis, no database.
    assert not (tmp_path / "redis.sock").exists() and not (tmp_path / "sluice.db").exists()


def test_model_path_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        "up",
        "--port",
        str(free_port()),
        SLUICE_ENGINE="hf",
        SLUICE_MODEL=str(tmp_path / "no" / "such" / "model"),
    )
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"sluice up: SLUICE_MODEL={tmp_path}/no/such/model does not exist")
