"""Migrations build exactly the tables sluice.models defines, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, insert, inspect, select
from sqlalchemy.engine import make_url

from sluice import migrate
from sluice.db import use_wal
from sluice.models import Base, Batch, Request
from sluice.scratch import scratch_database

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("SLUICE_TEST_DATABASE_URL", "")
HAVE_PG = PG_URL.startswith("postgresql")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A uniquely named, empty PostgreSQL database, dropped afterwards."""
    if not HAVE_PG:
        pytest.skip("SLUICE_TEST_DATABASE_URL names no postgresql server")
    with scratch_database(PG_URL, "sluice_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sluice.db'}"
    return str(request.getfixturevalue("pg_database"))


def _diffs(url: str) -> list[Any]:
    engine = migrate.migration_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = migrate.migration_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_matches_models(database_url: str) -> None:
    assert migrate.current_revision(database_url) is None
    migrate.upgrade(database_url)
    head = migrate.head_revision()
    assert head is not None
    assert migrate.current_revision(database_url) == head
    assert _tables(database_url) == {*Base.metadata.tables, "alembic_version"}
    assert _diffs(database_url) == []


def test_migrated_schema_accepts_rows(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = create_engine(migrate.sqlalchemy_url(database_url))
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(Batch).values(
                    id="b1",
                    endpoint="/v1/chat/completions",
                    model="m",
                    status="validating",
                    created_at=1,
                )
            )
            rows = [
                {
                    "batch_id": "b1",
                    "custom_id": f"c{i}",
                    "model": "m",
                    "endpoint": "/v1/chat/completions",
                    "queued_at": 1.0,
                }
                for i in range(3)
            ]
            conn.execute(insert(Request), rows)
            ids = conn.execute(select(Request.id).order_by(Request.id)).scalars().all()
        # The id column autoincrements on both backends (INTEGER rowid / BIGSERIAL).
        assert len(ids) == 3 and len(set(ids)) == 3 and all(isinstance(i, int) for i in ids)
        with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as conn:
            conn.execute(insert(Request), rows[:1])
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_reversible(database_url: str) -> None:
    migrate.upgrade(database_url)
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    migrate.downgrade(database_url, "base")
    assert migrate.current_revision(database_url) is None
    assert _tables(database_url) <= {"alembic_version"}
    migrate.upgrade(database_url)
    assert _diffs(database_url) == []


def _upgrade_after(barrier: Any, url: str) -> None:
    # Warm imports first so the processes really reach upgrade() together.
    migrate.alembic_config(url)
    barrier.wait()
    migrate.upgrade(url)


def test_concurrent_upgrades_do_not_collide(database_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_upgrade_after, args=(barrier, database_url)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert migrate.current_revision(database_url) == migrate.head_revision()
    assert _diffs(database_url) == []


def test_switching_to_wal_waits_out_another_writer(tmp_path: Path) -> None:
    # SQLite answers "database is locked" at once, without its busy handler, when a
    # connection switches a file to WAL while another holds a write transaction on it: one of
    # four concurrent upgrades of a fresh file died of it in CI. use_wal tries again.
    path = tmp_path / "fresh.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE t (x)")
    switcher = sqlite3.connect(path, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(switcher, within=0.2)  # bounded: still locked after the deadline
    attempts: list[str] = []
    retried = threading.Event()

    def trace(statement: str) -> None:
        attempts.append(statement)
        if len(attempts) == 2:  # the first attempt failed and a second one began
            retried.set()

    def commit_once_retried() -> None:
        retried.wait(30)
        holder.execute("COMMIT")

    switcher.set_trace_callback(trace)
    committer = threading.Thread(target=commit_once_retried)
    committer.start()
    use_wal(switcher)
    committer.join()
    assert switcher.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert len(attempts) >= 2


def test_alembic_cli_uses_settings(tmp_path: Path) -> None:
    # `alembic upgrade head` with no URL anywhere but SLUICE_DATA_DIR.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env["SLUICE_DATA_DIR"] = str(tmp_path / "data")
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    url = f"sqlite:///{tmp_path / 'data' / 'sluice.db'}"
    assert migrate.current_revision(url) == migrate.head_revision()
    assert _diffs(url) == []


def test_percent_in_url_survives_config(tmp_path: Path) -> None:
    # ConfigParser interpolates '%'; URL-encoded passwords and paths contain it.
    # Unescaped, Alembic's Config would raise InterpolationSyntaxError on this URL.
    url = f"sqlite:///{tmp_path / 'a%41b.db'}"
    migrate.upgrade(url)
    assert Path(str(make_url(url).database)).exists()
    assert migrate.current_revision(url) == migrate.head_revision()


def test_version_files_are_dated() -> None:
    names = [p.name for p in (REPO / "migrations" / "versions").glob("*.py")]
    assert names
    for name in names:
        assert name[:8].isdigit() and name[8] == "_", name
