"""Load: 200 concurrent clients submit single jobs and long-poll each until it ends, for 60 s.

Each client (an asyncio task; one httpx connection pool on loopback) loops: POST /v1/jobs, then
GET /v1/jobs/{id}?wait=30 until the job ends, then the next job. The stack is started by the
benchmark (API + echo worker, `sluice.stack.Stack`, embedded Redis), on SQLite, or on a scratch
PostgreSQL database (`--postgres`, or when SLUICE_TEST_DATABASE_URL names a server).

Submitting stops after --seconds; jobs still out then get --drain seconds to end. "lost" counts
jobs that were accepted (202) and never seen ended, "errors" every answer that was not a 2xx,
by status (or by exception for a failed connection), and every job that ended but not
succeeded. Submit latency: POST to 202. End to end: POST sent to the ended job's answer.
The database is counted afterwards: its requests must equal the accepted jobs, all succeeded.

    python bench/load.py [--clients 200] [--seconds 60] [--postgres [URL]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import func, select

from sluice.config import load_settings
from sluice.db import Database
from sluice.models import SUCCEEDED, TERMINAL_REQUEST, requests
from sluice.scratch import scratch_database
from sluice.stack import Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
WAIT = 30  # seconds per long-poll
# A long-poll answers within WAIT; anything slower than this is a hang, counted as an error.
TIMEOUT = WAIT + 15


@dataclass
class Tally:
    """What the clients saw."""

    submitted: int = 0  # POSTs sent
    accepted: int = 0  # 202s
    completed: int = 0  # ended jobs seen (any status)
    succeeded: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # status or exception -> count
    outstanding: set[str] = field(default_factory=set)  # accepted, not yet seen ended
    submit_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)


async def client(http: httpx.AsyncClient, n: int, tally: Tally, stop_at: float) -> None:
    """Submit a job, long-poll it to its end, repeat until stop_at."""
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        sent = time.monotonic()
        tally.submitted += 1
        try:
            r = await http.post("/v1/jobs", json={"prompt": f"client {n} job {i}", "max_tokens": 8})
        except httpx.HTTPError as exc:
            tally.errors[f"submit {type(exc).__name__}"] += 1
            continue
        if r.status_code != 202:
            tally.errors[f"submit {r.status_code}"] += 1
            continue
        tally.submit_s.append(time.monotonic() - sent)
        tally.accepted += 1
        job = r.json()
        tally.outstanding.add(job["id"])
        while job["status"] not in TERMINAL_REQUEST:
            try:
                r = await http.get(f"/v1/jobs/{job['id']}", params={"wait": WAIT})
            except httpx.HTTPError as exc:
                tally.errors[f"poll {type(exc).__name__}"] += 1
                break
            if r.status_code != 200:
                tally.errors[f"poll {r.status_code}"] += 1
                break
            job = r.json()
        else:
            tally.outstanding.discard(job["id"])
            tally.completed += 1
            tally.e2e_s.append(time.monotonic() - sent)
            if job["status"] == SUCCEEDED:
                tally.succeeded += 1
            else:
                tally.errors[f"job {job['status']}"] += 1


async def load(
    url: str, clients: int, seconds: float, drain: float, headers: dict[str, str] | None = None
) -> tuple[Tally, float]:
    """Run the clients; returns the tally and the seconds from first submit to last end."""
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=TIMEOUT, headers=headers
    ) as http:
        start = time.monotonic()
        tasks = [
            asyncio.create_task(client(http, n, tally, start + seconds)) for n in range(clients)
        ]
        # Bounded: whatever has not ended by the drain deadline is cancelled (and counted lost).
        _, pending = await asyncio.wait(tasks, timeout=seconds + drain)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        took = time.monotonic() - start
        for t in tasks:
            if not t.cancelled() and t.exception() is not None:
                tally.errors[f"client {type(t.exception()).__name__}"] += 1
        # A job whose poll failed may still have ended: lost is only what never ends.
        for job_id in list(tally.outstanding):
            r = await http.get(f"/v1/jobs/{job_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL_REQUEST:
                tally.outstanding.discard(job_id)
        return tally, took


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) in milliseconds; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@contextmanager
def stack_on(backend: str, pg_url: str) -> Iterator[Stack]:
    """API + echo worker on SQLite or a scratch PostgreSQL database; removed afterwards."""
    with ExitStack() as cleanup:
        data_dir = Path(tempfile.mkdtemp(prefix="sluice-load-"))
        cleanup.callback(shutil.rmtree, data_dir, ignore_errors=True)
        overrides: dict[str, object] = {"data_dir": data_dir}
        if backend == "postgres":
            overrides["database_url"] = cleanup.enter_context(
                scratch_database(pg_url, "sluice_load")
            )
        settings = load_settings(**overrides)
        # Embedded Redis for both backends: the shared server is never touched.
        stack = Stack(settings, "127.0.0.1", free_port(), env={"SLUICE_ENGINE": "echo"}, quiet=True)
        cleanup.callback(stack.stop)
        stack.start()
        yield stack


def db_counts(stack: Stack) -> tuple[int, int]:
    """(requests, succeeded requests) in the stack's database."""
    db = Database(stack.settings.resolved_database_url)
    try:
        with db.read() as conn:
            total = conn.execute(select(func.count()).select_from(requests)).scalar_one()
            ok = conn.execute(
                select(func.count()).where(requests.c.status == SUCCEEDED)
            ).scalar_one()
        return int(total), int(ok)
    finally:
        db.dispose()


def report(
    backend: str, clients: int, seconds: float, t: Tally, took: float, db: tuple[int, int]
) -> str:
    """The printed table."""
    errors = sum(t.errors.values())
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(t.errors.items())) or "-"
    rows = [
        ("clients", f"{clients}"),
        ("submitting for", f"{seconds:.0f} s (all ended after {took:.1f} s)"),
        ("submitted", f"{t.submitted}"),
        ("accepted (202)", f"{t.accepted}"),
        ("completed", f"{t.completed} ({t.succeeded} succeeded)"),
        ("errors", f"{errors} ({by_status})"),
        ("lost", f"{len(t.outstanding)}"),
        ("database rows", f"{db[0]} ({db[1]} succeeded)"),
        ("submit p50 / p99", f"{pct(t.submit_s, 0.5):.1f} / {pct(t.submit_s, 0.99):.1f} ms"),
        ("end-to-end p50 / p99", f"{pct(t.e2e_s, 0.5):.1f} / {pct(t.e2e_s, 0.99):.1f} ms"),
        ("throughput", f"{t.completed / took:.1f} jobs/s"),
    ]
    head = (
        f"Load: {clients} clients on loopback, each POST /v1/jobs then GET ?wait={WAIT} until "
        f"the job ends; echo engine, {backend}, embedded Redis."
    )
    return head + "\n\n" + "\n".join(f"  {k:<22}{v}" for k, v in rows) + "\n"


def main() -> int:
    """Start a stack, run the clients, print the table; exit 1 on any error or lost job."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long clients submit")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds for jobs still out")
    env_pg = os.environ.get("SLUICE_TEST_DATABASE_URL")
    ap.add_argument(
        "--postgres",
        nargs="?",
        const=env_pg or LOCAL_PG,
        default=env_pg,
        metavar="URL",
        help="PostgreSQL server for a scratch database (default: SLUICE_TEST_DATABASE_URL if set,"
        " else SQLite)",
    )
    args = ap.parse_args()
    backend = "postgres" if args.postgres else "sqlite"
    print(f"starting the stack ({backend}) ...", flush=True)
    with stack_on(backend, args.postgres or "") as stack:
        print(f"{args.clients} clients for {args.seconds:.0f} s ...", flush=True)
        tally, took = asyncio.run(
            load(stack.url, args.clients, args.seconds, args.drain, stack.auth_headers)
        )
        counts = db_counts(stack)
        dead = [c.name for c in stack.children if c.proc.poll() is not None]
    text = report(backend, args.clients, args.seconds, tally, took, counts)
    if dead:
        text += f"  exited during the run: {', '.join(dead)}\n"
    print()
    print(text, end="")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"load-{backend}.txt").write_text(text)
    print(f"wrote {OUT / f'load-{backend}.txt'}")
    bad = sum(tally.errors.values()) or tally.outstanding or counts != (tally.accepted,) * 2
    return 1 if bad or dead else 0


if __name__ == "__main__":
    sys.exit(main())
