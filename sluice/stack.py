"""The local stack: embedded Redis, migrations, then API and worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from sluice.config import Settings
from sluice.migrate import upgrade
from sluice.redis_server import ensure_redis


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Stack:
    """API + worker (+ embedded Redis when none is configured), as child processes."""

    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        env: Mapping[str, str] | None = None,
        quiet: bool = False,
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.extra_env = dict(env or {})
        self.quiet = quiet
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self.redis = ensure_redis(settings)
        self.url = f"http://{host}:{port}"

    def child_env(self) -> dict[str, str]:
        """The environment every child process gets (settings travel as SLUICE_ vars)."""
        return {
            **os.environ,
            **self.extra_env,
            "SLUICE_REDIS_URL": self.redis.url,
            "SLUICE_DATA_DIR": str(self.settings.data_dir.resolve()),
            "SLUICE_DATABASE_URL": self.settings.resolved_database_url,
        }

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `sluice ARGS...` as a child; quiet mode logs to DATA_DIR/<command>.log."""
        log_dir = Path(self.settings.data_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        stream = open(log_dir / f"{args[0]}.log", "ab") if self.quiet else None  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", *args],
            env={**self.child_env(), **(env or {})},
            stdout=stream,
            stderr=subprocess.STDOUT if self.quiet else None,
        )
        self.names.append(args[0])
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 120.0) -> None:
        """Migrate, start the API and one worker, wait until the API answers /readyz."""
        upgrade(self.settings.resolved_database_url)
        self.spawn("api", "--host", self.host, "--port", str(self.port))
        self.spawn("worker")
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in zip(self.names, self.procs, strict=True):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"sluice {name} exited with code {p.returncode}; "
                        f"see the logs in {self.settings.data_dir}"
                    )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready at {self.url} in {timeout:.0f}s")

    def wait(self) -> int:
        """Block until a child exits; returns its exit code."""
        while True:
            for p in self.procs:
                code = p.poll()
                if code is not None:
                    return code
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the children (warm shutdown), then stop the embedded Redis."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.names.clear()
        self.redis.stop()
