"""The embedded Redis: started on a Unix socket, reused, stopped; real redis-server processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from sluice.config import Settings, load_settings
from sluice.redis_server import (
    EmbeddedRedisError,
    RedisHandle,
    ensure_redis,
    ping,
    shutdown_embedded,
    socket_path,
)


def _settings(data_dir: Path) -> Settings:
    # redis_url=None explicitly: the environment may name a real Redis.
    return load_settings(data_dir=data_dir, redis_url=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_until(predicate: object, timeout: float = 10.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = _settings(tmp_path / "data")
    yield s
    # Whatever a failing test left running goes now.
    shutdown_embedded(s)


def test_starts_answers_ping_and_stops(settings: Settings) -> None:
    handle = ensure_redis(settings)
    try:
        sock = (settings.data_dir / "redis.sock").resolve()
        assert handle.url == f"unix://{sock}"
        assert handle.owned
        client = redis.Redis.from_url(handle.url)
        assert client.ping() is True
        client.set("k", "v")
        assert client.get("k") == b"v"
        # No TCP port, no persistence: the embedded server is private and disposable.
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert (sock.stat().st_mode & 0o777) == 0o700
        client.close()
        assert handle.server is not None
        pid = handle.server.pid
        assert pid is not None
        assert (settings.data_dir / "redis.pid").read_text().strip() == str(pid)
        assert (settings.data_dir / "redis.log").exists()
    finally:
        handle.stop()
    assert not ping(sock)
    assert not _alive(pid)
    assert not (settings.data_dir / "redis.pid").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(handle.url, retry=None).ping()


def test_second_ensure_reuses_running_server(settings: Settings) -> None:
    first = ensure_redis(settings)
    try:
        assert first.server is not None
        pid = first.server.pid
        second = ensure_redis(settings)
        assert second.url == first.url
        assert not second.owned
        assert second.server is None
        assert redis.Redis.from_url(second.url).ping() is True
        # Stopping a handle that did not start the server leaves it running.
        second.stop()
        assert redis.Redis.from_url(first.url).ping() is True
        assert pid is not None and _alive(pid)
    finally:
        first.stop()
    assert not ping(socket_path(settings.data_dir))


def test_concurrent_callers_share_one_server(settings: Settings) -> None:
    barrier = threading.Barrier(4)
    handles: list[RedisHandle] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            handles.append(ensure_redis(settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors
        assert len(handles) == 4
        assert len({h.url for h in handles}) == 1
        assert sum(h.owned for h in handles) == 1
        assert redis.Redis.from_url(handles[0].url).ping() is True
    finally:
        for h in handles:
            h.stop()
    assert not ping(socket_path(settings.data_dir))


def test_configured_url_starts_nothing(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path / "data", redis_url="redis://127.0.0.1:6390/3")
    handle = ensure_redis(s)
    assert handle.url == "redis://127.0.0.1:6390/3"
    assert not handle.owned
    handle.stop()
    assert not (tmp_path / "data").exists()


def test_long_data_dir_uses_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    s = _settings(deep)
    sock = socket_path(deep)
    assert len(str(deep / "redis.sock")) > 100
    assert sock.parent == Path("/tmp")
    assert socket_path(deep) == sock  # every process derives the same path
    handle = ensure_redis(s)
    try:
        assert handle.url == f"unix://{sock}"
        assert redis.Redis.from_url(handle.url).ping() is True
        assert ensure_redis(s).url == handle.url
    finally:
        handle.stop()
    assert not sock.exists()


def test_stale_socket_file_is_replaced(settings: Settings) -> None:
    # A server killed with SIGKILL leaves its socket file behind.
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "redis.sock").write_text("stale")
    handle = ensure_redis(settings)
    try:
        assert handle.owned
        assert redis.Redis.from_url(handle.url).ping() is True
    finally:
        handle.stop()


def test_detached_server_outlives_handle(settings: Settings) -> None:
    handle = ensure_redis(settings, detach=True)
    assert handle.server is not None
    pid = handle.server.pid
    assert pid is not None
    try:
        # Its own session: a Ctrl-C on the terminal of `sluice api` does not reach it.
        assert os.getsid(pid) == pid
        assert (settings.data_dir / "redis.pid").read_text().strip() == str(pid)
        assert not handle.owned
        handle.stop()
        assert redis.Redis.from_url(handle.url).ping() is True
        assert not ensure_redis(settings).owned
    finally:
        assert shutdown_embedded(settings) is True
    assert not ping(socket_path(settings.data_dir))
    assert _wait_until(lambda: not _alive(pid))
    assert not (settings.data_dir / "redis.pid").exists()
    assert shutdown_embedded(settings) is False


def test_start_failure_names_the_log(settings: Settings) -> None:
    # A directory where the socket should be: redis-server cannot bind and exits.
    (settings.data_dir / "redis.sock").mkdir(parents=True)
    with pytest.raises(EmbeddedRedisError) as info:
        ensure_redis(settings, start_timeout=10)
    message = str(info.value)
    assert str((settings.data_dir / "redis.log").resolve()) in message
    assert "redis-server" in message


_CHILD = """
import sys
from pathlib import Path
from sluice.config import load_settings
from sluice.redis_server import ensure_redis
h = ensure_redis(load_settings(data_dir=Path(sys.argv[1]), redis_url=None), detach=True)
print(h.owned, h.server is not None, h.url, flush=True)
sys.stdin.read()  # stay alive until the test closes stdin
"""


def test_other_processes_reuse_and_stop_it(settings: Settings) -> None:
    # `sluice api` starts the server detached and keeps running; `sluice worker` (another
    # process) reuses it; an operator stops it from a third while the starter still lives.
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(settings.data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        owned, started, url = child.stdout.readline().split()
        assert (owned, started) == ("False", "True")
        mine = ensure_redis(settings)
        assert mine.url == url
        assert not mine.owned
        assert redis.Redis.from_url(url).ping() is True
        began = time.monotonic()
        assert shutdown_embedded(settings) is True
        # The starter reaps its child: no zombie for the stopper to wait out.
        assert time.monotonic() - began < 5
        assert not ping(socket_path(settings.data_dir))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
