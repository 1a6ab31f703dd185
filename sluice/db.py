"""Database connections: one engine per URL, SQLite tuned for several processes."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from sluice.config import Settings


class Database:
    """A database URL's engines: `write()` for transactions, `read()` for queries."""

    def __init__(self, url: str) -> None:
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
            # No pre-ping: it costs a round trip per checkout; callers retry on OperationalError.
            self.engine = create_engine(url, pool_size=10, max_overflow=20)
            self.read_engine = self.engine

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


def _sqlite_engine(url: str, begin: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy drive transactions; pysqlite's own BEGIN handling is off.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)

    return engine


_databases: dict[str, Database] = {}


def get_database(settings: Settings) -> Database:
    """The process's Database for the configured URL."""
    url = settings.resolved_database_url
    if url not in _databases:
        _databases[url] = Database(url)
    return _databases[url]
