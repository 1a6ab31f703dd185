"""Requests/s end to end on the echo engine: upload to every result committed, vs a naive design.

Sluice: the real API and worker processes (sluice.stack.Stack). The clock runs on the client
from the start of the upload (a /v1/completions file streamed from disk) through
POST /v1/batches until GET /v1/batches/{id} says completed (its completed_at is whole
seconds, so the client's clock is the measure).

Naive, in the same run on the same backend: the rows are bulk-inserted straight into the
database (no HTTP: this favours the naive design), then one Celery task per prompt is
published on a separate queue and consumed by bench/naive_worker.py (threads pool, 8
threads), which runs the echo engine on each prompt and commits each result on its own.
The clock stops when every row is finished.

    python bench/e2e.py [--requests 100000] [--naive-requests 5000] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from celery import Celery
from sqlalchemy import func, insert, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path holds bench/ itself: make `bench.*` importable beside sluice.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest import (  # noqa: E402
    MIB,
    OUT,
    PG_URL,
    REDIS_URL,
    Backend,
    create_batch,
    fresh_backend,
    pg_available,
    stop_process,
    table,
    upload,
)
from bench.naive_worker import QUEUE as NAIVE_QUEUE  # noqa: E402
from bench.naive_worker import TASK as NAIVE_TASK  # noqa: E402
from sluice.config import load_settings  # noqa: E402
from sluice.db import Database  # noqa: E402
from sluice.ids import new_batch_id, now, unix  # noqa: E402
from sluice.models import (  # noqa: E402
    BULK,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    SUCCEEDED,
    TERMINAL_BATCH,
    batches,
    requests,
)
from sluice.queue import broker_url  # noqa: E402
from sluice.stack import Stack, free_port  # noqa: E402

MODEL = "sluice-echo"
COMPLETIONS = "/v1/completions"
NAIVE_THREADS = 8
POLL = 0.05
_WORDS = ("amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet")


def prompt(i: int) -> str:
    """A short prompt (about 8 words), different for each request."""
    words = [_WORDS[(i + k) % len(_WORDS)] for k in range(6)]
    return f"prompt {i} " + " ".join(words)


def body(i: int) -> dict[str, object]:
    """A /v1/completions body: short prompt, max_tokens 16."""
    return {"model": MODEL, "prompt": prompt(i), "max_tokens": 16}


def write_file(path: Path, n: int) -> None:
    """The OpenAI batch file of n completions requests."""
    with path.open("w", encoding="utf-8", buffering=MIB) as fh:
        for i in range(n):
            line = {"custom_id": f"req-{i}", "method": "POST", "url": COMPLETIONS, "body": body(i)}
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")


@dataclass
class Phase:
    """A stretch of a run: its wall time and the CPU seconds each process spent in it."""

    name: str
    seconds: float
    cpu: dict[str, float]


@dataclass
class Measured:
    """One design's run on one backend."""

    backend: str
    design: str
    requests: int
    phases: list[Phase]
    first_result: float | None = None  # seconds after the batch was created
    steady: float | None = None  # requests/s between 10% and 90% completed

    @property
    def seconds(self) -> float:
        """Start of the first phase to the end of the last."""
        return sum(p.seconds for p in self.phases)

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


class CpuMeter:
    """CPU seconds (user + system) per process, lap by lap (one lap per phase).

    PostgreSQL counts the backends connected to the benchmark's database and the server's
    background processes (WAL writer, checkpointer, autovacuum), not other databases'
    backends; Redis counts every redis-server. `machine` is every process's busy time:
    on a shared machine the rest of it is other people's load.
    """

    def __init__(self, pids: dict[str, int], database_url: str | None = None) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.database: str | None = None
        self.pg: Database | None = None
        if database_url is not None and database_url.startswith("postgresql"):
            self.database = make_url(database_url).database
            self.pg = Database(database_url)
        self.last = self._read()
        self.t = time.perf_counter()
        self.phases: list[Phase] = []

    def _servers(self) -> dict[int, str]:
        """pid -> label of the server processes that count."""
        out = {
            p.pid: "redis"
            for p in psutil.process_iter(["name"])
            if p.info["name"] == "redis-server"
        }
        if self.pg is not None:
            with self.pg.read() as conn:
                rows = conn.execute(text("SELECT pid, datname FROM pg_stat_activity")).all()
            for pid, datname in rows:
                if datname is None or datname == self.database:
                    out[pid] = "postgres"
        return out

    def _read(self) -> dict[tuple[str, int], float]:
        out = {(name, p.pid): _cpu(p) for name, p in self.procs.items()}
        for pid, label in self._servers().items():
            out[(label, pid)] = _cpu_pid(pid)
        out[("machine", 0)] = _busy()
        return out

    def lap(self, name: str) -> None:
        """Close a phase here: its wall seconds, and CPU seconds since the last lap."""
        now_t, cur = time.perf_counter(), self._read()
        used: dict[str, float] = {}
        for key, value in cur.items():
            # A process born during the phase (a new connection) counts from zero.
            used[key[0]] = used.get(key[0], 0.0) + value - self.last.get(key, 0.0)
        self.phases.append(Phase(name, now_t - self.t, used))
        self.last, self.t = cur, now_t

    def close(self) -> None:
        """Close the meter's own database connection."""
        if self.pg is not None:
            self.pg.dispose()


def _cpu_pid(pid: int) -> float:
    try:
        return _cpu(psutil.Process(pid))
    except psutil.Error:
        return 0.0


def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
    except psutil.Error:  # gone since (a closed PostgreSQL connection)
        return 0.0
    return float(t.user + t.system)


def _busy() -> float:
    t = psutil.cpu_times()
    # steal and iowait are not work; guest time is already inside user time.
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


@contextmanager
def profiled(pids: dict[str, int], out: Path | None, tag: str) -> Iterator[None]:
    """py-spy record each process (raw collapsed stacks) while the block runs, if asked."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [spy, "record", "--rate", "200", "--format", "raw", "--threads", "--nonblocking"]
    procs = [
        subprocess.Popen(
            [*cmd, "--pid", str(pid), "--output", str(out / f"profile-{tag}-{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(0.5)  # py-spy attaches before the clock starts
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def measure_sluice(
    be: Backend, n: int, path: Path, extra_env: dict[str, str], prof: Path | None
) -> Measured:
    """Upload, create, and poll until completed, through the real API and worker."""
    settings = load_settings(
        data_dir=be.data_dir, database_url=be.database_url, redis_url=be.redis_url
    )
    env = {
        "SLUICE_ENGINE": "echo",
        "SLUICE_MODEL": MODEL,
        "SLUICE_MAX_FILE_LINES": str(max(50_000, n)),
        **extra_env,
    }
    stack = Stack(settings, "127.0.0.1", free_port(), env=env, quiet=True)
    stack.start()
    try:
        pids = dict(zip(stack.names, (p.pid for p in stack.procs), strict=True))
        with (
            profiled(pids, prof, be.name),
            httpx.Client(base_url=stack.url, timeout=600, headers=stack.auth_headers) as client,
        ):
            cpu = CpuMeter(pids, be.database_url)
            f = upload(client, path)
            cpu.lap("upload")
            b = create_batch(client, f["id"], COMPLETIONS)
            cpu.lap("create")
            t2 = time.perf_counter()
            progress = []
            while b["status"] not in TERMINAL_BATCH:
                time.sleep(POLL)
                b = client.get(f"/v1/batches/{b['id']}").json()
                progress.append((time.perf_counter() - t2, b["request_counts"]["completed"]))
            cpu.lap("process")
            cpu.close()
    finally:
        stack.stop()
    counts = b["request_counts"]
    if b["status"] != COMPLETED or counts["completed"] != n or counts["failed"]:
        raise RuntimeError(f"sluice batch ended {b['status']} with {counts}")
    first = next((t for t, done in progress if done), None)
    return Measured(be.name, "sluice", n, cpu.phases, first, steady_rate(progress, n))


def steady_rate(progress: Sequence[tuple[float, int]], n: int) -> float | None:
    """Requests/s from the poll that saw 10% done to the one that saw 90% done."""
    lo = next(((t, d) for t, d in progress if d >= n * 0.1), None)
    hi = next(((t, d) for t, d in progress if d >= n * 0.9), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return None
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def start_naive_worker(be: Backend) -> subprocess.Popen[bytes]:
    """`celery -A bench.naive_worker worker -P threads -c 8 -Q naive` on this backend."""
    env = {**os.environ, **be.env(), "PYTHONPATH": str(ROOT)}
    args = f"worker -P threads -c {NAIVE_THREADS} -Q {NAIVE_QUEUE} --loglevel WARNING"
    cmd = [sys.executable, "-m", "celery", "-A", "bench.naive_worker", *args.split()]
    with open(be.data_dir / "naive-worker.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def insert_naive_rows(db: Database, bodies: Sequence[str]) -> tuple[str, list[int]]:
    """A batch and its request rows, in one bulk transaction; returns (batch id, row ids)."""
    batch_id = new_batch_id()
    queued_at = now()
    rows = [
        {
            "batch_id": batch_id,
            "line_no": i + 1,
            "custom_id": f"req-{i}",
            "body": b,
            "model": MODEL,
            "endpoint": COMPLETIONS,
            "priority": BULK,
            "status": QUEUED,
            "attempts": 0,
            "queued_at": queued_at,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        for i, b in enumerate(bodies)
    ]
    batch = {
        "id": batch_id,
        "owner": "default",
        "kind": "batch",
        "endpoint": COMPLETIONS,
        "model": MODEL,
        "status": IN_PROGRESS,
        "priority": BULK,
        "completion_window": "24h",
        "created_at": unix(),
        "total": len(rows),
    }
    with db.write() as conn:
        conn.execute(insert(batches).values(**batch))
        returning = insert(requests).returning(requests.c.id, sort_by_parameter_order=True)
        ids = conn.execute(returning, rows).scalars().all()
    return batch_id, list(ids)


def count_finished(db: Database, batch_id: str, statuses: Sequence[str]) -> int:
    """Rows of the batch in these statuses."""
    with db.read() as conn:
        n: int = conn.execute(
            select(func.count())
            .select_from(requests)
            .where(requests.c.batch_id == batch_id, requests.c.status.in_(statuses))
        ).scalar_one()
    return n


def measure_naive(be: Backend, n: int) -> Measured:
    """Insert the rows, publish one task per prompt, wait until every row is finished."""
    worker = start_naive_worker(be)
    app = Celery("naive-client", broker=broker_url(be.redis_url), set_as_current=False)
    app.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    db = Database(be.database_url)
    try:
        _wait_worker(app, worker)
        bodies = [json.dumps(body(i), separators=(",", ":")) for i in range(n)]
        cpu = CpuMeter({"worker": worker.pid}, be.database_url)
        batch_id, ids = insert_naive_rows(db, bodies)
        cpu.lap("insert")
        with app.producer_or_acquire() as producer:
            for rid, b in zip(ids, bodies, strict=True):
                args = [rid, COMPLETIONS, b]
                app.send_task(NAIVE_TASK, args=args, queue=NAIVE_QUEUE, producer=producer)
        cpu.lap("publish")
        while count_finished(db, batch_id, (SUCCEEDED, FAILED)) < n:
            if worker.poll() is not None:
                raise RuntimeError(f"the naive worker exited ({worker.returncode})")
            time.sleep(POLL)
        cpu.lap("drain")
        cpu.close()
        if failed := count_finished(db, batch_id, (FAILED,)):
            raise RuntimeError(f"{failed} naive requests failed")
    finally:
        stop_process(worker)
        db.dispose()
        app.close()
    return Measured(be.name, "naive", n, cpu.phases)


def _wait_worker(app: Celery, worker: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the naive worker exited ({worker.returncode}) before it was ready")
        if app.control.ping(timeout=0.5):
            return
    raise RuntimeError(f"the naive worker was not ready in {timeout:.0f}s")


def results_table(results: Sequence[Measured]) -> str:
    """The main table: requests/s per backend and design, and the ratio to naive."""
    naive = {r.backend: r.rate for r in results if r.design == "naive"}
    rows = []
    for r in results:
        ratio = f"{r.rate / naive[r.backend]:.1f}x" if r.backend in naive else "-"
        rows.append([r.backend, r.design, r.requests, r.seconds, round(r.rate), ratio])
    return table(["backend", "design", "requests", "seconds", "requests/s", "vs naive"], rows)


def phases_table(results: Sequence[Measured]) -> str:
    """Where the time went: each phase's seconds and the CPU seconds spent in it."""
    names = ["api", "worker", "postgres", "redis", "machine"]
    rows: list[list[object]] = []
    for r in results:
        for ph in r.phases:
            rows.append([r.backend, r.design, ph.name, ph.seconds]
                        + [f"{ph.cpu[k]:.1f}" if k in ph.cpu else "-" for k in names])  # fmt: skip
    headers = ["backend", "design", "phase", "wall s", *(f"{k} CPU s" for k in names)]
    notes = []
    for r in results:
        if r.first_result is not None and r.steady is not None:
            notes.append(
                f"{r.backend} {r.design}: first result {r.first_result:.2f} s after create; "
                f"steady rate (10% to 90% done) {r.steady:,.0f} requests/s"
            )
    return table(headers, rows) + ("\n" + "\n".join(notes) if notes else "")


def note(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and save) its tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000, help="requests through Sluice")
    p.add_argument("--naive-requests", type=int, default=5_000, help="requests, naive design")
    p.add_argument("--skip-postgres", action="store_true", help="no PostgreSQL run")
    p.add_argument("--skip-sqlite", action="store_true", help="no SQLite run")
    p.add_argument("--skip-naive", action="store_true", help="Sluice only (no ratio)")
    p.add_argument("--pg-url", default=PG_URL, help="PostgreSQL server (a database is created)")
    p.add_argument("--redis-url", default=REDIS_URL, help="Redis for the PostgreSQL run (flushed)")
    p.add_argument(
        "--set", action="append", default=[], metavar="SLUICE_X=V", help="a setting, repeatable"
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="py-spy the API and worker into bench/out/ (with fewer worker threads, e.g. "
        "--set SLUICE_WORKER_THREADS=32, py-spy keeps up)",
    )
    args = p.parse_args(argv)
    extra_env = dict(kv.split("=", 1) for kv in args.set)

    kinds = [] if args.skip_sqlite else ["sqlite"]
    if not args.skip_postgres:
        why = pg_available(args.pg_url, args.redis_url)
        if why:
            print(f"PostgreSQL or Redis unavailable ({why}); use --skip-postgres", file=sys.stderr)
            return 2
        kinds.append("postgres")

    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / f"work-e2e-{os.getpid()}"
    work.mkdir()
    results: list[Measured] = []
    try:
        path = work / "completions.jsonl"
        write_file(path, args.requests)
        for kind in kinds:
            with fresh_backend(kind, work, args.pg_url, args.redis_url) as be:
                if not args.skip_naive:
                    note(f"[e2e] {kind}: naive, {args.naive_requests:,} requests ...")
                    results.append(measure_naive(be, args.naive_requests))
                note(f"[e2e] {kind}: sluice, {args.requests:,} requests ...")
                prof = OUT if args.py_spy else None
                results.append(measure_sluice(be, args.requests, path, extra_env, prof))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings_note = f"; settings {' '.join(args.set)}" if args.set else ""
    report = (
        "End to end on the echo engine: upload start to every result committed "
        f"(/v1/completions, max_tokens 16){settings_note}\n"
        f"naive: 1 Celery task per prompt, {NAIVE_THREADS} threads, 1 UPDATE + commit per "
        "result (rows bulk-inserted, no HTTP)\n\n"
        + results_table(results)
        + "\n\ntargets: >= 10,000 requests/s on PostgreSQL, >= 10x naive\n\n"
        + f"Phases, CPU seconds per process ({os.cpu_count()} cores; postgres = this database's "
        "backends + background processes; machine = every process, others' load included)\n\n"
        + phases_table(results)
        + "\n"
    )
    print(report, end="")
    (OUT / "e2e.txt").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
