"""Scratch PostgreSQL databases: made for one test run or benchmark, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sluice.migrate import sqlalchemy_url


@contextmanager
def scratch_database(server_url: str, prefix: str = "sluice_scratch") -> Iterator[str]:
    """A new, empty database on the server of `server_url`; yields its URL, then drops it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(sqlalchemy_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: a test that failed may leave connections open; the drop must not hang.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
