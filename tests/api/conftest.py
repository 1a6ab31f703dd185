"""Run the real API over HTTP: a fresh database per module (SQLite, and PostgreSQL when
SLUICE_TEST_DATABASE_URL names one), real Redis, uvicorn on a free port in a thread."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from api.app import create_app
from api.server import bounded
from sluice.config import Settings, load_settings
from sluice.db import Database, get_database
from sluice.redis_server import ensure_redis
from sluice.scratch import scratch_database
from sluice.store.keys import create_key
from tests.api.helpers import Api

PG_URL = os.environ.get("SLUICE_TEST_DATABASE_URL", "")
REDIS_URL = os.environ.get("SLUICE_TEST_REDIS_URL", "")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL.startswith("postgresql") else [])]
START_TIMEOUT = 30.0


def _migrate(url: str) -> None:
    try:
        from sluice.migrate import upgrade
    except ImportError:  # before migrations exist: the models are the schema
        from sluice.models import Base

        engine = Database(url).engine
        Base.metadata.create_all(engine)
        engine.dispose()
        return
    upgrade(url)


@pytest.fixture(scope="module", params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, migrated database for this test module."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'sluice.db'}"
        _migrate(url)
        yield url
        return
    with scratch_database(PG_URL, "sluice_test") as url:
        _migrate(url)
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SLUICE_TEST_REDIS_URL, else an embedded redis-server for this test session."""
    if REDIS_URL:
        yield REDIS_URL
        return
    data_dir = tmp_path_factory.mktemp("redis")
    with ensure_redis(load_settings(data_dir=data_dir), detach=False) as handle:
        yield handle.url


def _free_socket() -> socket.socket:
    # Bound here and handed to uvicorn: no window in which another process takes the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """Serve create_app(settings) with uvicorn in a thread; yields the base URL."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings),
        log_level="warning",
        lifespan="on",
        http=bounded(settings.max_header_bytes),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server exited during start-up")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API server did not start within {START_TIMEOUT}s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT)
        sock.close()


# Small limits so that limit tests stay fast; a module can ask for others.
DEFAULTS: dict[str, Any] = {
    "max_file_bytes": 256 * 1024,
    "max_line_bytes": 4096,
    "max_file_lines": 1000,
    "max_wait_seconds": 30.0,
}


@pytest.fixture(scope="module")
def start_api(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., AbstractContextManager[Api]]:
    """Start an API on this module's database with settings overrides (a context manager)."""
    data_dir = tmp_path_factory.mktemp("data")

    @contextmanager
    def start(**overrides: Any) -> Iterator[Api]:
        # A model name of its own: so are its Redis queue keys, even on a shared Redis.
        model = f"apitest-{uuid.uuid4().hex[:8]}"
        values = {
            **DEFAULTS,
            "data_dir": data_dir,
            "database_url": database_url,
            "redis_url": redis_url,
            "engine": "echo",
            "model": model,
            **overrides,
        }
        settings = load_settings(**values)
        client = redis.Redis.from_url(redis_url)
        db = get_database(settings)
        # Auth is on, as in production: the test client sends a key of owner "default". It
        # lives in the module's database: a test may point the API at a dead one.
        keys_db = Database(database_url)
        try:
            key, _ = create_key(keys_db, owner="default", name="tests")
        finally:
            keys_db.dispose()
        headers = {"Authorization": f"Bearer {key}"}
        try:
            with (
                serve(settings) as url,
                httpx.Client(base_url=url, timeout=60, headers=headers) as http,
            ):
                yield Api(url, settings, http, client, db, key)
        finally:
            # The queues of this module's model (and kombu's bindings for them).
            for key in client.scan_iter(match=f"*sluice.{model}*"):
                client.delete(key)
            client.close()

    return start


@pytest.fixture(scope="module")
def api(start_api: Callable[..., AbstractContextManager[Api]]) -> Iterator[Api]:
    """The module's API with the default test settings."""
    with start_api() as running:
        yield running
