"""The whole stack as real processes: API and worker via `sluice`, real Redis and database."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from sluice.config import Settings, load_settings
from sluice.scratch import scratch_database
from sluice.stack import Stack, free_port

PG_URL = os.environ.get("SLUICE_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL")
BACKENDS = ["sqlite"] + (["postgres"] if PG_URL and REDIS_URL else [])


@dataclass
class Running:
    """A started stack and what tests need to talk to it."""

    stack: Stack
    settings: Settings
    http: httpx.Client
    redis: redis.Redis
    backend: str

    def wait_batch(self, batch_id: str, timeout: float = 120) -> dict[str, Any]:
        """Poll a batch until it ends (a deadline, not a sleep-for-result)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b: dict[str, Any] = self.http.get(f"/v1/batches/{batch_id}").json()
            if b["status"] in ("completed", "failed", "expired", "cancelled"):
                return b
            time.sleep(0.1)
        raise AssertionError(f"batch {batch_id} did not finish in {timeout}s: {b}")

    def wait_for(self, check: Callable[[], bool], timeout: float = 60) -> None:
        """Poll a condition until it holds, or fail after the deadline."""
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, "condition never held"
            time.sleep(0.05)

    def submit_file(self, lines: list[dict[str, Any]], endpoint: str) -> str:
        """Upload lines and create their batch (without waiting); returns the batch id."""
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        f = self.http.post(
            "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}
        )
        assert f.status_code == 200, f.text
        b = self.http.post(
            "/v1/batches",
            json={
                "input_file_id": f.json()["id"],
                "endpoint": endpoint,
                "completion_window": "24h",
            },
        )
        assert b.status_code == 200, b.text
        return str(b.json()["id"])

    def run_file(self, lines: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
        """Upload lines, create a batch, wait for it."""
        return self.wait_batch(self.submit_file(lines, endpoint))

    def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        """A result file's lines, parsed."""
        if not file_id:
            return []
        r = self.http.get(f"/v1/files/{file_id}/content")
        assert r.status_code == 200, r.text
        return [json.loads(x) for x in r.text.splitlines() if x]


def start_stack(backend: str, data_dir: Path, **env: str) -> Iterator[Running]:
    """Start API + worker on the backend; yields a Running; stops everything after."""
    cleanup = ExitStack()
    overrides: dict[str, Any] = {"data_dir": data_dir}
    if backend == "postgres":
        assert PG_URL and REDIS_URL
        overrides["database_url"] = cleanup.enter_context(scratch_database(PG_URL, "sluice_test"))
        overrides["redis_url"] = REDIS_URL
        redis.Redis.from_url(REDIS_URL).flushdb()
    env_all = {"SLUICE_ENGINE": "echo", **env}
    if "redis_url" in overrides:
        env_all["SLUICE_REDIS_URL"] = overrides["redis_url"]
    settings = load_settings(**overrides)
    stack = Stack(settings, "127.0.0.1", free_port(), env=env_all, quiet=True)
    try:
        stack.start()
        # The local admin key the stack made (DATA_DIR/api-key): auth is on, as by default.
        with httpx.Client(base_url=stack.url, timeout=60, headers=stack.auth_headers) as http:
            yield Running(stack, settings, http, redis.Redis.from_url(stack.redis.url), backend)
    finally:
        stack.stop()
        cleanup.close()


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend the environment offers: SQLite + embedded Redis, PostgreSQL + Redis."""
    return str(request.param)
