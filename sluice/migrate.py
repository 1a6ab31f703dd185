"""Schema migrations: Alembic's upgrade, run from code, one process at a time per database."""

from __future__ import annotations

import importlib.util
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from sluice.db import SQLITE_BUSY_SECONDS, use_wal
from sluice.errors import ConfigError

# migrations/ sits beside the sluice package in a source checkout and an editable install.
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Session-level advisory lock that serialises upgrades on one PostgreSQL database
# (an arbitrary constant: the ASCII of "sluiceMG").
PG_LOCK_KEY = 0x736C7569_63654D47


def _is_ours(path: Path) -> bool:
    return (path / "env.py").is_file() and (path / "script.py.mako").is_file()


def migrations_dir() -> Path:
    """The Alembic script directory, or a ConfigError saying why it is missing.

    Beside the sluice package in a source checkout or an editable install; in a wheel
    install, the "migrations" package the wheel carries (another project's package of that
    name has no env.py and script.py.mako, so it is passed over).
    """
    if _is_ours(MIGRATIONS_DIR):
        return MIGRATIONS_DIR
    spec = importlib.util.find_spec("migrations")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if _is_ours(Path(location)):
            return Path(location)
    raise ConfigError(
        f"Alembic migrations not found (neither at {MIGRATIONS_DIR} nor as the installed "
        "'migrations' package): reinstall Sluice (pip install .)"
    )


def sqlalchemy_url(database_url: str) -> str:
    """The URL with an explicit driver: plain postgresql:// means psycopg 3 here."""
    parsed = make_url(database_url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(database_url: str) -> bool:
    """True for a sqlite:// URL."""
    return make_url(database_url).get_backend_name() == "sqlite"


def migration_engine(database_url: str) -> Engine:
    """An engine for running migrations (no pool: it is used once)."""
    url = sqlalchemy_url(database_url)
    if not is_sqlite(url):
        return create_engine(url, poolclass=NullPool)
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        # SQLAlchemy, not pysqlite, issues BEGIN, so DDL runs inside the transaction.
        # foreign_keys stays OFF: batch mode rebuilds tables by DROP + RENAME, and with
        # it ON dropping `batches` would cascade-delete every request.
        dbapi_conn.isolation_level = None
        use_wal(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock before reading alembic_version: a second process
        # upgrading the same file waits here, then finds the schema already at head.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the database's migration lock (PostgreSQL advisory lock; SQLite: BEGIN IMMEDIATE)."""
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
    # End the autobegun transaction so Alembic opens (and commits) its own.
    conn.commit()
    try:
        yield
    finally:
        if conn.in_transaction():
            conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
        conn.commit()


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic Config built in code: the script directory, and the URL if given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if database_url is not None:
        # ConfigParser interpolates '%': a URL-encoded password must survive it.
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database's schema up to `revision` (default: the newest)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Take the database's schema down to `revision` ("base" removes every table)."""
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    """The newest revision in migrations/versions."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    engine = migration_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
