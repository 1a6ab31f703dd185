"""Fault tests: real API and worker processes, crashed, killed and stopped on purpose."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, func, select

from sluice.models import requests
from tests.e2e.conftest import Running, backend  # noqa: F401 - the backend fixture

# Slow enough to be caught mid-run, fast enough for 2 cores: ~20 ms per 16-token request.
SIM_ENV = {
    "SLUICE_ENGINE": "sim",
    "SLUICE_SIM_DECODE_STEP": "0.001",
    "SLUICE_SIM_DECODE_PER_SEQ": "0",
    "SLUICE_SIM_PREFILL_PER_TOKEN": "0",
    "SLUICE_RECONCILE_INTERVAL": "0.5",
    "SLUICE_IDLE_POLL": "0.2",
}


def completion_lines(
    n: int, max_tokens: int = 16, poison: int | None = None
) -> list[dict[str, Any]]:
    """A /v1/completions file of n lines; line `poison` carries the POISON marker."""
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "sluice-echo",
                "prompt": f"{'POISON ' if i == poison else ''}request {i}",
                "max_tokens": max_tokens,
            },
        }
        for i in range(n)
    ]


def submit(sluice: Running, lines: list[dict[str, Any]]) -> str:
    """Upload a completions file and create its batch; returns the batch id."""
    return sluice.submit_file(lines, "/v1/completions")


class Rows:
    """Reads a batch's request rows straight from the database."""

    def __init__(self, sluice: Running, batch_id: str) -> None:
        self.engine = create_engine(sluice.settings.resolved_database_url)
        self.batch_id = batch_id

    def count(self, status: str) -> int:
        """Requests of the batch in this status."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        requests.c.batch_id == self.batch_id, requests.c.status == status
                    )
                ).scalar_one()
            )

    def all(self) -> list[Any]:
        """(custom_id, status, crashes, error_code, lease_owner) of every request."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(
                        requests.c.custom_id,
                        requests.c.status,
                        requests.c.crashes,
                        requests.c.error_code,
                        requests.c.lease_owner,
                    ).where(requests.c.batch_id == self.batch_id)
                ).all()
            )

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()


@contextmanager
def rows_of(sluice: Running, batch_id: str) -> Iterator[Rows]:
    """A Rows reader, disposed after."""
    rows = Rows(sluice, batch_id)
    try:
        yield rows
    finally:
        rows.close()


@contextmanager
def supervised(sluice: Running) -> Iterator[None]:
    """Run the stack's supervisor (as `sluice up` does) in a thread."""
    thread = threading.Thread(target=sluice.stack.supervise, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sluice.stack.request_stop()
        thread.join(5)
