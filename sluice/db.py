"""Database connections: one engine per URL, SQLite tuned for several processes."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

from sluice.config import Settings

# How long SQLite waits for another connection's lock before "database is locked".
SQLITE_BUSY_SECONDS = 60.0


class Database:
    """A database URL's engines: `write()` for transactions, `read()` for queries."""

    def __init__(self, url: str, ping_after_idle: float = 1.0) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.is_postgres = parsed.get_backend_name() == "postgresql"
        if self.is_postgres and parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # Writers take the lock up front (BEGIN IMMEDIATE): a reader that later
            # upgrades to a writer is how SQLite deadlocks between processes.
            self.engine = _sqlite_engine(url, begin="BEGIN IMMEDIATE")
            self.read_engine = _sqlite_engine(url, begin="BEGIN")
        else:
            # No pre-ping on every checkout (a round trip each, on the worker's hot path):
            # only a connection idle for ping_after_idle seconds is pinged (see below).
            # connect_timeout: an unreachable server fails a call in bounded time (a 503).
            self.engine = create_engine(
                url,
                # Bound values (prompts, outputs) never reach logs or error messages.
                hide_parameters=True,
                pool_size=10,
                max_overflow=20,
                connect_args={"connect_timeout": CONNECT_TIMEOUT},
            )
            self.read_engine = self.engine
            _ping_idle_connections(self.engine, ping_after_idle)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection in a transaction that commits on success."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for queries (its transaction is rolled back)."""
        with self.read_engine.connect() as conn:
            yield conn

    def dispose(self) -> None:
        """Close pooled connections (before fork, and at exit)."""
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


CONNECT_TIMEOUT = 10


def _ping_idle_connections(engine: Engine, after: float) -> None:
    """Ping a pooled connection at checkout when it sat idle for `after` seconds.

    A database restart kills every pooled connection; without this the first call after it
    fails. Busy connections (the worker's, a loaded API's) are never idle that long, so
    they pay nothing; a dead one is replaced before the caller sees it.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < after:
            return
        try:
            # As SQLAlchemy's pre-ping: the transaction this opens is the caller's.
            dbapi_conn.execute("SELECT 1")
        except Exception as err:
            # The pool discards this connection and checks out (or opens) another.
            raise exc.DisconnectionError(f"idle connection is dead: {err}") from err


def use_wal(dbapi_conn: sqlite3.Connection, within: float = SQLITE_BUSY_SECONDS) -> None:
    """Put the SQLite database in WAL mode, waiting out other connections' locks.

    The switch needs the file to itself, and SQLite answers "database is locked" at once,
    without its busy handler, while another connection holds it: several processes opening a
    fresh file together (four concurrent upgrades in CI; sluice up's API and worker) lost one.
    """
    deadline = time.monotonic() + within
    delay = 0.005
    while True:
        try:
            dbapi_conn.execute("PRAGMA journal_mode=WAL").close()
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)  # a retry with backoff, as a busy handler would
            delay = min(2 * delay, 0.1)


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(
        url,
        hide_parameters=True,
        connect_args={"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy drive transactions; pysqlite's own BEGIN handling is off.
        dbapi_conn.isolation_level = None
        use_wal(dbapi_conn)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


_databases: dict[str, Database] = {}


def get_database(settings: Settings, ping_after_idle: float | None = None) -> Database:
    """The process's Database for the configured URL.

    ping_after_idle: ping a pooled connection idle this long before handing it out
    (default SLUICE_DB_PING_AFTER_IDLE; the API passes 0: every checkout, so the first
    call after a database restart succeeds however quick the restart).
    """
    url = settings.resolved_database_url
    ping = settings.db_ping_after_idle if ping_after_idle is None else ping_after_idle
    key = f"{url}#{ping}"
    if key not in _databases:
        _databases[key] = Database(url, ping)
    return _databases[key]
