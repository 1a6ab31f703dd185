"""Bulk ingestion: a chat batch file uploaded and queued over HTTP, against a plain bulk insert.

For each backend (SQLite + embedded Redis, PostgreSQL + Redis) the API runs alone (no worker,
so nothing is consumed while it is measured). The file is streamed from disk with httpx to
POST /v1/files, then POST /v1/batches checks it and queues every line. The floor is the time
to bulk-insert the same request rows (bodies included) into `requests` on a fresh database
with the same schema, in one transaction: executemany on SQLite, COPY on PostgreSQL.

Then the API's memory while a 200 MB file is uploaded, as growth over its idle RSS.

    python bench/ingest.py [--lines 50000] [--big-mb 200] [--skip-postgres]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

from sluice.config import load_settings
from sluice.db import Database
from sluice.ids import new_batch_id, now, unix
from sluice.migrate import upgrade
from sluice.models import BULK, IN_PROGRESS, QUEUED, batches, requests
from sluice.queue import queue_name
from sluice.redis_server import ensure_redis
from sluice.scratch import scratch_database
from sluice.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/12"
MODEL = "sluice-echo"
CHAT = "/v1/chat/completions"
LINE_BYTES = 1000
MB = 1_000_000
MIB = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 200 * MIB

_WORDS = ("river", "stone", "lantern", "meadow", "copper", "violet", "harbor", "quiet",
          "ember", "falcon", "orchard", "signal", "granite", "willow", "thunder")  # fmt: skip
# Long enough to cut any message from, at any offset: lines differ, no two are alike.
_FILLER = " ".join(_WORDS[i % len(_WORDS)] + str(i % 7) for i in range(600))


# ---------------------------------------------------------------------------------------------
# Shared with bench/e2e.py: backends, the API process, tables.


@dataclass
class Backend:
    """A fresh database and the Redis that goes with it."""

    name: str
    database_url: str
    redis_url: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """The SLUICE_* variables that point a child process at this backend."""
        return {
            "SLUICE_DATABASE_URL": self.database_url,
            "SLUICE_REDIS_URL": self.redis_url,
            "SLUICE_DATA_DIR": str(self.data_dir),
        }


@contextmanager
def fresh_database(kind: str, work: Path, pg_url: str) -> Iterator[str]:
    """A new, empty database at the head schema; dropped (PostgreSQL) or deleted after."""
    name = f"sluice_bench_{uuid.uuid4().hex[:10]}"
    if kind == "sqlite":
        folder = work / name
        folder.mkdir(parents=True)
        url = f"sqlite:///{folder / 'sluice.db'}"
        try:
            upgrade(url)
            yield url
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    with scratch_database(pg_url, "sluice_bench") as url:
        upgrade(url)
        yield url


@contextmanager
def fresh_backend(kind: str, work: Path, pg_url: str, redis_url: str) -> Iterator[Backend]:
    """SQLite + embedded Redis, or PostgreSQL + the given Redis database (flushed first)."""
    data_dir = work / f"{kind}-{uuid.uuid4().hex[:8]}"
    data_dir.mkdir(parents=True)
    try:
        with fresh_database(kind, work, pg_url) as url:
            if kind == "sqlite":
                # Started here and passed down: the API and workers reuse it, this stops it.
                handle = ensure_redis(load_settings(data_dir=data_dir))
                try:
                    yield Backend(kind, url, handle.url, data_dir)
                finally:
                    handle.stop()
            else:
                redis.Redis.from_url(redis_url).flushdb()
                yield Backend(kind, url, redis_url, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def pg_available(pg_url: str, redis_url: str) -> str | None:
    """None when PostgreSQL and Redis answer, else why not."""
    try:
        engine = create_engine(make_url(pg_url).set(drivername="postgresql+psycopg"))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class ApiProcess:
    """`python -m sluice.cli api` alone, as a child process (no worker)."""

    def __init__(self, backend: Backend, env: Mapping[str, str]) -> None:
        self.backend = backend
        self.env = {**os.environ, **backend.env(), **env}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ApiProcess:
        log = open(self.backend.data_dir / "api.log", "ab")
        cmd = [sys.executable, "-m", "sluice.cli", "api", "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_ready(self.url, [self.proc])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def pid(self) -> int:
        """The API process id."""
        assert self.proc is not None
        return self.proc.pid


def wait_ready(url: str, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """Wait until the API answers /readyz; fail at once if a child died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with code {p.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API at {url} was not ready in {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upload(client: httpx.Client, path: Path) -> dict[str, Any]:
    """POST /v1/files with the file streamed from disk (httpx reads it in chunks)."""
    with path.open("rb") as fh:
        r = client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": (path.name, fh, "application/jsonl")},
        )
    if r.status_code != 200:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
    body: dict[str, Any] = r.json()
    return body


def create_batch(client: httpx.Client, file_id: str, endpoint: str) -> dict[str, Any]:
    """POST /v1/batches; raises unless the batch is in_progress."""
    r = client.post(
        "/v1/batches",
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
    )
    if r.status_code != 200:
        raise RuntimeError(f"batch create failed: {r.status_code} {r.text[:500]}")
    body: dict[str, Any] = r.json()
    if body["status"] != "in_progress":
        raise RuntimeError(f"batch is {body['status']}: {json.dumps(body.get('errors'))[:500]}")
    return body


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [list(headers), *[[_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        first = r[0].ljust(widths[0])
        lines.append(
            "  ".join([first, *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))])
        )
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# The input file and the floor.


def chat_line(i: int, line_bytes: int = LINE_BYTES) -> str:
    """One OpenAI batch line for /v1/chat/completions, padded to about line_bytes."""
    head = f"question {i}: "
    # The JSON around the message is about 150 bytes.
    size = max(1, line_bytes - 150 - len(head))
    start = (i * 7) % (len(_FILLER) - size) if len(_FILLER) > size else 0
    content = head + _FILLER[start : start + size]
    line = {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": MODEL,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": content}],
        },
    }
    return json.dumps(line, separators=(",", ":")) + "\n"


def write_file(path: Path, lines: int | None = None, max_bytes: int | None = None) -> int:
    """Write `lines` chat lines, or as many as fit in max_bytes; returns the line count."""
    written = size = 0
    with path.open("w", encoding="utf-8", buffering=MIB) as fh:
        while lines is None or written < lines:
            line = chat_line(written)
            if max_bytes is not None and size + len(line) > max_bytes:
                break
            fh.write(line)
            size += len(line)
            written += 1
    return written


def request_rows(path: Path, batch_id: str) -> list[dict[str, Any]]:
    """The rows Sluice queues for this file, each carrying its body (not timed)."""
    queued_at = now()
    rows = []
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            obj = json.loads(raw)
            rows.append(
                {
                    "batch_id": batch_id,
                    "line_no": line_no,
                    "custom_id": obj["custom_id"],
                    "body": json.dumps(obj["body"], separators=(",", ":")),
                    "model": obj["body"]["model"],
                    "endpoint": obj["url"],
                    "priority": BULK,
                    "status": QUEUED,
                    "attempts": 0,
                    "queued_at": queued_at,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                }
            )
    return rows


_COPY_COLUMNS = (
    "batch_id",
    "line_no",
    "custom_id",
    "body",
    "model",
    "endpoint",
    "priority",
    "status",
    "attempts",
    "queued_at",
    "prompt_tokens",
    "completion_tokens",
)


def floor_insert(database_url: str, path: Path) -> float:
    """Seconds to insert the file's request rows in one transaction, the plainest fast way."""
    batch_id = new_batch_id()
    rows = request_rows(path, batch_id)
    db = Database(database_url)
    try:
        with db.read() as conn:  # connect (and set PRAGMAs) before the clock starts
            conn.execute(text("SELECT 1"))
        t0 = time.perf_counter()
        with db.write() as conn:
            conn.execute(
                insert(batches).values(
                    id=batch_id,
                    owner="default",
                    kind="batch",
                    endpoint=CHAT,
                    model=MODEL,
                    status=IN_PROGRESS,
                    priority=BULK,
                    completion_window="24h",
                    created_at=unix(),
                    total=len(rows),
                )
            )
            if db.is_postgres:
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                with cursor.copy(f"COPY requests ({', '.join(_COPY_COLUMNS)}) FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(tuple(row[c] for c in _COPY_COLUMNS))
            else:
                conn.execute(insert(requests), rows)
        elapsed = time.perf_counter() - t0
        with db.read() as conn:
            n = conn.execute(select(func.count()).select_from(requests)).scalar_one()
        if n != len(rows):
            raise RuntimeError(f"floor inserted {n} rows, expected {len(rows)}")
        return elapsed
    finally:
        db.dispose()


# ---------------------------------------------------------------------------------------------
# The measurements.


@dataclass
class IngestResult:
    """One backend's upload + queue against its floor."""

    backend: str
    rows: int
    upload_s: float
    create_s: float
    floor_s: float

    @property
    def total_s(self) -> float:
        """Upload start to POST /v1/batches returned."""
        return self.upload_s + self.create_s


# With SLUICE_AUTH=off any Authorization header will do; state changes need one.
BENCH_AUTH = {"Authorization": "Bearer bench"}


def api_env(lines: int, file_bytes: int) -> dict[str, str]:
    """Limits that admit the benchmark's files."""
    return {
        # Ingest speed is measured, not keys: the benchmark's API runs without them.
        "SLUICE_AUTH": "off",
        # No worker runs in this benchmark: /readyz then waits for the database and Redis.
        "SLUICE_READY_REQUIRES_WORKER": "false",
        "SLUICE_MAX_FILE_LINES": str(max(50_000, lines)),
        "SLUICE_MAX_FILE_BYTES": str(max(DEFAULT_MAX_FILE_BYTES, file_bytes + MIB)),
    }


def queued_messages(redis_url: str) -> int:
    """Messages waiting on the bulk queue of the benchmark's model."""
    return int(redis.Redis.from_url(redis_url).llen(queue_name(MODEL, BULK)))


def measure_ingest(
    kind: str, work: Path, path: Path, lines: int, args: argparse.Namespace
) -> IngestResult:
    """Upload + queue over HTTP on a fresh backend, then the floor on another fresh database."""
    with fresh_backend(kind, work, args.pg_url, args.redis_url) as be:
        with (
            ApiProcess(be, api_env(lines, path.stat().st_size)) as api,
            httpx.Client(base_url=api.url, timeout=600, headers=BENCH_AUTH) as client,
        ):
            t0 = time.perf_counter()
            f = upload(client, path)
            t1 = time.perf_counter()
            b = create_batch(client, f["id"], CHAT)
            t2 = time.perf_counter()
        if b["request_counts"]["total"] != lines:
            raise RuntimeError(f"batch counts {b['request_counts']}, expected {lines} requests")
        check_queued(be, b["id"], lines)
    with fresh_database(kind, work, args.pg_url) as url:
        floor = floor_insert(url, path)
    return IngestResult(kind, lines, t1 - t0, t2 - t1, floor)


def check_queued(be: Backend, batch_id: str, lines: int) -> None:
    """Every line is a queued request row, and its messages wait in Redis."""
    db = Database(be.database_url)
    try:
        with db.read() as conn:
            n = conn.execute(
                select(func.count())
                .select_from(requests)
                .where(requests.c.batch_id == batch_id, requests.c.status == QUEUED)
            ).scalar_one()
    finally:
        db.dispose()
    settings = load_settings(**_settings_from_env(be))
    want = math.ceil(lines / settings.chunk_size)
    got = queued_messages(be.redis_url)
    if n != lines or got != want:
        raise RuntimeError(f"{n} queued rows and {got} messages; expected {lines} and {want}")


def _settings_from_env(be: Backend) -> dict[str, Any]:
    return {"data_dir": be.data_dir, "database_url": be.database_url, "redis_url": be.redis_url}


@dataclass
class MemoryResult:
    """The API's RSS while it received a large upload."""

    backend: str
    file_bytes: int
    lines: int
    upload_s: float
    idle_rss: int
    peak_rss: int

    @property
    def growth(self) -> int:
        """Peak over idle."""
        return self.peak_rss - self.idle_rss


class RssSampler:
    """Samples a process's RSS every `interval` seconds on a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def vm_hwm(pid: int) -> int:
    """The kernel's peak RSS of a process (VmHWM), in bytes; 0 where /proc lacks it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure_memory(
    kind: str, work: Path, path: Path, lines: int, args: argparse.Namespace
) -> MemoryResult:
    """A fresh API process: idle RSS, then its peak RSS while the big file is uploaded."""
    size = path.stat().st_size
    with (
        fresh_backend(kind, work, args.pg_url, args.redis_url) as be,
        ApiProcess(be, api_env(lines, size)) as api,
        httpx.Client(base_url=api.url, timeout=600, headers=BENCH_AUTH) as client,
    ):
        time.sleep(1.0)  # let start-up settle before taking the idle figure
        idle = psutil.Process(api.pid).memory_info().rss
        with RssSampler(api.pid) as sampler:
            t0 = time.perf_counter()
            f = upload(client, path)
            elapsed = time.perf_counter() - t0
        if f["bytes"] != size:
            raise RuntimeError(f"stored {f['bytes']} bytes, sent {size}")
        # VmHWM also catches a spike between two samples (it includes start-up, so it
        # can only overstate the growth).
        peak = max(sampler.peak, vm_hwm(api.pid))
    return MemoryResult(kind, size, lines, elapsed, idle, peak)


INGEST_HEADERS = ["backend", "rows", "upload s", "create s", "upload+queue s", "floor s",
                  "ratio", "target"]  # fmt: skip
MEMORY_HEADERS = ["backend", "file MB", "upload s", "MB/s", "idle RSS MB", "peak RSS MB",
                  "growth MB", "target"]  # fmt: skip


def ingest_table(results: Sequence[IngestResult], lines: int, size: int) -> str:
    """The upload + queue table, with its title."""
    rows = [
        [r.backend, r.rows, r.upload_s, r.create_s, r.total_s, r.floor_s,
         f"{r.total_s / r.floor_s:.2f}x", "<= 3x"]
        for r in results
    ]  # fmt: skip
    return (
        "Upload + queue over HTTP vs the floor (plain bulk insert of the same request rows)\n"
        f"file: {lines:,} chat lines, {size / MB:.1f} MB; API process alone (no worker)\n\n"
        + table(INGEST_HEADERS, rows)
    )


def memory_table(results: Sequence[MemoryResult]) -> str:
    """The memory table, with its title."""
    m0 = results[0]
    rows = [
        [m.backend, m.file_bytes / MB, m.upload_s, m.file_bytes / MB / m.upload_s,
         m.idle_rss / MIB, m.peak_rss / MIB, m.growth / MIB, "< 100 MB"]
        for m in results
    ]  # fmt: skip
    return (
        f"API process memory while uploading a {m0.file_bytes / MB:.0f} MB file "
        f"({m0.lines:,} lines); RSS sampled every 20 ms, and VmHWM\n\n"
        + table(MEMORY_HEADERS, rows)
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and save) its tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lines", type=int, default=50_000, help="lines in the chat file")
    p.add_argument("--big-mb", type=int, default=200, help="memory test file size (MB); 0 skips")
    p.add_argument("--skip-postgres", action="store_true", help="SQLite only")
    p.add_argument("--pg-url", default=PG_URL, help="PostgreSQL server (a database is created)")
    p.add_argument("--redis-url", default=REDIS_URL, help="Redis for the PostgreSQL runs (flushed)")
    args = p.parse_args(argv)

    kinds = ["sqlite"]
    if not args.skip_postgres:
        why = pg_available(args.pg_url, args.redis_url)
        if why:
            print(f"PostgreSQL or Redis unavailable ({why}); use --skip-postgres", file=sys.stderr)
            return 2
        kinds.append("postgres")

    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / f"work-ingest-{os.getpid()}"
    work.mkdir()
    report = []
    try:
        path = work / "chat.jsonl"
        write_file(path, lines=args.lines)
        size = path.stat().st_size
        results = []
        for kind in kinds:
            print(f"[ingest] {kind}: {args.lines:,} lines ...", file=sys.stderr, flush=True)
            results.append(measure_ingest(kind, work, path, args.lines, args))
        report.append(ingest_table(results, args.lines, size))
        path.unlink()
        if args.big_mb > 0:
            big = work / "big.jsonl"
            big_lines = write_file(big, max_bytes=args.big_mb * MB)
            mem = []
            for kind in kinds:
                print(f"[memory] {kind}: {args.big_mb} MB upload ...", file=sys.stderr, flush=True)
                mem.append(measure_memory(kind, work, big, big_lines, args))
            report.append(memory_table(mem))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text_out = "\n\n".join(report) + "\n"
    print(text_out, end="")
    (OUT / "ingest.txt").write_text(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
