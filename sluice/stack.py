"""The local stack: embedded Redis, migrations, then API and worker processes, supervised.

`supervise()` restarts a child that exits: a crashed worker's leases are released at once
(each incarnation gets its own SLUICE_WORKER_ID, the owner name on its leases), so its rows
run again without waiting out the lease; the API stays up meanwhile.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from sluice.config import Settings
from sluice.db import Database
from sluice.errors import StartFailed
from sluice.local_key import ensure_local_key
from sluice.migrate import upgrade
from sluice.queue import stats_key
from sluice.redis_clients import sync_client
from sluice.redis_server import ensure_redis
from sluice.signals import SUPERVISOR_PID_ENV, sleep_until
from sluice.store import work

log = logging.getLogger("sluice.stack")

# A child that dies sooner than this after its start is crash-looping: restarts back off.
HEALTHY_AFTER = 30.0
MAX_BACKOFF = 30.0
# stop(): past the shutdown grace, a worker exits within 8 s (worker/main.py) and the API at
# once (uvicorn's graceful timeout is the grace); a child still running after this is stuck.
STOP_MARGIN = 15.0
# While the worker loads its model, start() says it is still waiting this often (seconds).
LOADING_NOTE_EVERY = 30.0


def port_in_use(host: str, port: int) -> bool:
    """True when something already listens on host:port (or it cannot be bound)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[int | None]:
    """Hold DATA_DIR/up.lock for this `sluice up`; yields None, or the pid of its holder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            yield int(text) if text.isdigit() else -1
            return
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield None
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """One supervised process: what started it, and its restarts."""

    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    started: float
    worker_id: str | None = None
    restarts: int = 0
    restart_at: float | None = None  # a restart waiting out its backoff
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The sluice subcommand it runs."""
        return self.args[0]


class StopRequested(Exception):
    """A stop signal came while the stack was starting."""


class Stack:
    """API + worker (+ embedded Redis when none is configured), as child processes."""

    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        env: Mapping[str, str] | None = None,
        quiet: bool = False,
        flower_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.extra_env = dict(env or {})
        self.quiet = quiet
        self.children: list[Child] = []
        # Set by request_stop(), stop() and kill(), maybe from a signal handler: a plain flag,
        # no lock for a signal to land inside.
        self.stop_requested = False
        self.redis = ensure_redis(settings)
        self.url = f"http://{host}:{port}"
        # The local admin key (DATA_DIR/api-key), made by start() once the tables exist.
        self.api_key: str | None = None
        self.flower_port = flower_port  # set: start Flower there too (sluice up)

    def child_env(self) -> dict[str, str]:
        """The environment every child process gets (settings travel as SLUICE_ vars)."""
        return {
            **os.environ,
            **self.extra_env,
            "SLUICE_REDIS_URL": self.redis.url,
            "SLUICE_DATA_DIR": str(self.settings.data_dir.resolve()),
            "SLUICE_DATABASE_URL": self.settings.resolved_database_url,
        }

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header that authenticates a client with the local admin key."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The children's current processes, in start order."""
        return [c.proc for c in self.children]

    @property
    def names(self) -> list[str]:
        """The children's subcommands, in start order."""
        return [c.name for c in self.children]

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `sluice ARGS...` as a child; quiet mode logs to DATA_DIR/<command>.log."""
        child = Child(args, *self._popen(args, dict(env or {})), extra_env=dict(env or {}))
        self.children.append(child)
        return child.proc

    def _popen(
        self, args: tuple[str, ...], env: dict[str, str]
    ) -> tuple[subprocess.Popen[bytes], float, str | None]:
        """Start the process: (process, start time, worker id for a worker)."""
        log_dir = Path(self.settings.data_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        stream = open(log_dir / f"{args[0]}.log", "ab") if self.quiet else None  # noqa: SIM115
        if args[0] == "worker":
            # Its own owner name on its leases, so they can be released when it dies.
            env = {**env, "SLUICE_WORKER_ID": f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "sluice.cli", *args],
            env={**self.child_env(), **env, SUPERVISOR_PID_ENV: str(os.getpid())},
            stdout=stream,
            stderr=subprocess.STDOUT if self.quiet else None,
            # Own session: a terminal's Ctrl-C reaches this process alone, which stops the
            # children in order, once each; they die with it all the same (SUPERVISOR_PID_ENV).
            start_new_session=True,
        )
        if stream is not None:
            stream.close()  # the child holds its own copy
        return proc, time.monotonic(), env.get("SLUICE_WORKER_ID")

    def request_stop(self) -> None:
        """Ask start() and supervise() to return (safe in a signal handler: sets a flag)."""
        self.stop_requested = True

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise StopRequested

    def start(self, timeout: float = 120.0) -> None:
        """Migrate, start the API and one worker, wait until the API answers /readyz;
        StopRequested if request_stop() was called meanwhile, StartFailed saying why if a
        child exits or is not ready in time."""
        upgrade(self.settings.resolved_database_url)
        db = Database(self.settings.resolved_database_url)
        try:
            self.api_key = ensure_local_key(self.settings, db)
        finally:
            db.dispose()
        self._check_stop()
        self.spawn("api", "--host", self.host, "--port", str(self.port))
        self._check_stop()
        self.spawn("worker")
        self._check_stop()
        # Webhook delivery in a process of its own: a slow receiver never touches an engine.
        self.spawn("webhooks")
        if self.flower_port is not None:
            self._check_stop()
            # Supervised like the others; its login comes from settings (sluice/flower.py).
            self.spawn("flower", env={"SLUICE_FLOWER_PORT": str(self.flower_port)})
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until /readyz is 200: `timeout` for the API, SLUICE_WORKER_START_TIMEOUT once only
        the worker is missing (loading its model), saying so every LOADING_NOTE_EVERY s."""
        started = time.monotonic()
        deadline = started + timeout
        next_note = started + LOADING_NOTE_EVERY
        loading = False  # the API answered that only the worker is missing
        while True:
            self._check_stop()
            for name, p in zip(self.names, self.procs, strict=True):
                if p.poll() is not None:
                    raise StartFailed(
                        f"sluice {name} exited with code {p.returncode}; "
                        f"see the logs in {self.settings.data_dir}"
                    )
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200:
                    return
                if _only_workers_down(ready):
                    # The API is up; the worker is still loading its model (minutes for a
                    # real one, longer on a first download). A worker that dies ends the wait.
                    loading = True
                    deadline = started + self.settings.worker_start_timeout
            except httpx.HTTPError:
                pass
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_note:
                next_note += LOADING_NOTE_EVERY
                print(f"still starting: waiting for the worker to load {self.settings.model} "
                      f"({now - started:.0f}s; logs in {self.settings.data_dir.resolve()})",
                      file=sys.stderr, flush=True)  # fmt: skip
            sleep_until(lambda: self.stop_requested, 0.2)
        if loading:
            raise StartFailed(
                f"the worker did not load {self.settings.model} in "
                f"{self.settings.worker_start_timeout:.0f}s (SLUICE_WORKER_START_TIMEOUT; a "
                f"first download may need longer); see the logs in {self.settings.data_dir}"
            )
        raise StartFailed(f"the API did not become ready at {self.url} in {timeout:.0f}s")

    def supervise(self, poll: float = 0.2) -> None:
        """Keep every child running until interrupted: restart what exits, with a backoff
        when it crash-loops, releasing a dead worker's leases first."""
        while not self.stop_requested:
            self._keep_redis()
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child)
                    continue
                code = child.proc.poll()
                if code is not None:
                    self._on_exit(child, code)
            # Not Event.wait: a Ctrl-C inside its lock can break it (sluice/signals.py).
            sleep_until(lambda: self.stop_requested, poll)

    def _keep_redis(self) -> None:
        """Restart the embedded redis-server if it died: same socket, so everyone reconnects."""
        server = self.redis.server
        if server is None or not self.redis.owned or server.running or self.stop_requested:
            return
        print("the embedded redis-server exited; restarting it (it keeps nothing: the "
              "database is the queue)", file=sys.stderr, flush=True)  # fmt: skip
        try:
            server.start()
        except Exception as exc:  # try again next round
            print(f"could not restart redis-server: {exc}", file=sys.stderr, flush=True)

    def _on_exit(self, child: Child, code: int) -> None:
        """A child died: say so, release a worker's leases, schedule the restart."""
        if self.stop_requested:
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        ran = time.monotonic() - child.started
        # A worker that came up (its stats are in Redis) and then died restarts at once: it
        # was doing work, and every second of backoff is a second of idle engine. One that
        # dies before coming up, or an API that dies young, is crash-looping: back off.
        healthy = ran > HEALTHY_AFTER or self._came_up(child)
        backoff = 0.0 if healthy else min(MAX_BACKOFF, 2.0**child.restarts)
        print(
            f"sluice {child.name} {how} after {ran:.0f}s; restarting it"
            + (f" in {backoff:.0f}s" if backoff else ""),
            file=sys.stderr,
            flush=True,
        )
        if child.worker_id:
            self._release(child.worker_id)
        child.restarts = 0 if healthy else child.restarts + 1
        child.restart_at = time.monotonic() + backoff

    def _came_up(self, child: Child) -> bool:
        """True when this worker incarnation published its stats (it loaded its engine)."""
        if not child.worker_id:
            return False
        try:
            client = sync_client(self.redis.url)
            try:
                return bool(client.exists(stats_key(child.worker_id)))
            finally:
                client.close()
        except redis.RedisError:
            return False

    def _release(self, worker_id: str) -> None:
        """Put a dead worker's rows back in the queue now rather than after its leases."""
        db = Database(self.settings.resolved_database_url)
        try:
            requeued, _ = work.release_owner(db, worker_id, self.settings.max_attempts)
            if requeued:
                print(
                    f"released {len(requeued)} requests the worker held",
                    file=sys.stderr,
                    flush=True,
                )
        except Exception as exc:  # the database may be down too: the leases expire instead
            print(f"could not release the worker's requests ({exc}); their leases will expire",
                  file=sys.stderr, flush=True)  # fmt: skip
        finally:
            db.dispose()

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        if self.stop_requested:
            return
        child.proc, child.started, child.worker_id = self._popen(child.args, child.extra_env)

    def kill(self) -> None:
        """Stop at once (a second Ctrl-C): SIGKILL the children, release the workers' leases."""
        self.stop_requested = True
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
            if child.worker_id:
                self._release(child.worker_id)
        self.children.clear()
        self.redis.stop()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the children (warm shutdown), then stop the embedded Redis. A child still
        running after `timeout` (default: SLUICE_SHUTDOWN_GRACE + STOP_MARGIN, past what a
        worker or the API takes) is killed, and said so."""
        self.stop_requested = True
        budget = self.settings.shutdown_grace + STOP_MARGIN if timeout is None else timeout
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + budget
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"sluice {child.name} did not stop in {budget:.0f}s after SIGTERM; "
                      "killing it", file=sys.stderr, flush=True)  # fmt: skip
                child.proc.kill()
                child.proc.wait()
        self.children.clear()
        self.redis.stop()


def _only_workers_down(ready: httpx.Response) -> bool:
    """A /readyz 503 that says only that no worker is live yet."""
    try:
        return ready.status_code == 503 and ready.json().get("down") == ["workers"]
    except ValueError:
        return False
