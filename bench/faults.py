"""The price of crashes: 10,000 requests undisturbed vs with the worker SIGKILLed 3 times.

Each run starts a fresh supervised stack (`sluice.stack.Stack` with `supervise()` in a thread,
as `sluice up` runs it): API + one sim worker (about 20 ms per 16-token request, 64 slots),
SQLite (or a scratch PostgreSQL database with --postgres) and the embedded Redis. A disturbed
run SIGKILLs the worker process when 20, 40 and 60 % of the batch has succeeded; the supervisor
releases the dead worker's leases and starts a new one. Runs alternate, undisturbed first, so
drift in the machine's load falls on both kinds alike.

The clock runs from POST /v1/batches to the batch's completed status (polled every 50 ms).
Every run is checked: each custom_id exactly once in the output file, none failed, and a
disturbed run really restarted its worker three times.

    python bench/faults.py [--requests 10000] [--pairs 3] [--postgres [URL]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from sluice.config import load_settings
from sluice.db import Database
from sluice.models import SUCCEEDED, requests
from sluice.scratch import scratch_database
from sluice.stack import Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
# The fault tests' sim engine (tests/faults/conftest.py): ~20 ms per 16-token request.
SIM_ENV = {
    "SLUICE_ENGINE": "sim",
    "SLUICE_SIM_DECODE_STEP": "0.001",
    "SLUICE_SIM_DECODE_PER_SEQ": "0",
    "SLUICE_SIM_PREFILL_PER_TOKEN": "0",
    "SLUICE_RECONCILE_INTERVAL": "0.5",
    "SLUICE_IDLE_POLL": "0.2",
    "SLUICE_MAX_NUM_SEQS": "64",
}
KILL_AT = (0.2, 0.4, 0.6)
POLL = 0.05
RUN_TIMEOUT = 600.0
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Run:
    """One run of the batch."""

    kind: str  # "undisturbed" or "3x SIGKILL"
    seconds: float
    restarts: int
    to_restart: float  # seconds from each kill to the new process, summed (supervisor backoff)
    to_result: float  # seconds from each new process to its first result, summed (start-up)
    problems: list[str]


def batch_file(n: int) -> bytes:
    """A /v1/completions file of n short requests (max_tokens 16)."""
    return "".join(
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "sluice-echo", "prompt": f"request {i}", "max_tokens": 16}}
        ) + "\n"
        for i in range(n)
    ).encode()  # fmt: skip


@contextmanager
def supervised_stack(backend: str, pg_url: str, env: dict[str, str]) -> Iterator[Stack]:
    """A started stack with its supervisor running; everything removed afterwards."""
    with ExitStack() as cleanup:
        data_dir = Path(tempfile.mkdtemp(prefix="sluice-faults-"))
        cleanup.callback(shutil.rmtree, data_dir, ignore_errors=True)
        overrides: dict[str, object] = {"data_dir": data_dir}
        if backend == "postgres":
            overrides["database_url"] = cleanup.enter_context(
                scratch_database(pg_url, "sluice_faults")
            )
        stack = Stack(load_settings(**overrides), "127.0.0.1", free_port(), env=env, quiet=True)
        cleanup.callback(stack.stop)  # also ends supervise()
        stack.start()
        supervisor = threading.Thread(target=stack.supervise, daemon=True)
        supervisor.start()
        yield stack


def succeeded(db: Database, batch_id: str) -> int:
    """Rows of the batch that succeeded."""
    with db.read() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    requests.c.batch_id == batch_id, requests.c.status == SUCCEEDED
                )
            ).scalar_one()
        )


def wait(check: Any, what: str, timeout: float = RUN_TIMEOUT) -> None:
    """Poll until check() holds; raise after the deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(POLL)


def run(n: int, data: bytes, kills: bool, backend: str, pg_url: str, env: dict[str, str]) -> Run:
    """One run on a fresh stack; with `kills`, SIGKILL the worker at each KILL_AT fraction."""
    with (
        supervised_stack(backend, pg_url, env) as stack,
        httpx.Client(base_url=stack.url, timeout=60, headers=stack.auth_headers) as http,
    ):
        db = Database(stack.settings.resolved_database_url)
        worker = stack.children[stack.names.index("worker")]
        try:
            f = http.post(
                "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)}
            )
            f.raise_for_status()
            start = time.monotonic()
            b = http.post("/v1/batches", json={"input_file_id": f.json()["id"],
                          "endpoint": "/v1/completions", "completion_window": "24h"})  # fmt: skip
            b.raise_for_status()
            batch_id = b.json()["id"]
            restarts, to_restart, to_result = 0, 0.0, 0.0
            if kills:
                for at in KILL_AT:
                    wait(lambda at=at: succeeded(db, batch_id) >= at * n, f"{at:.0%} done")
                    proc = worker.proc
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed, before = time.monotonic(), succeeded(db, batch_id)
                    # The supervisor starts the next one (after releasing the leases).
                    wait(lambda p=proc: worker.proc is not p, "the restart", 60)
                    restarts += 1
                    spawned = time.monotonic()
                    wait(lambda b=before: succeeded(db, batch_id) > b, "a result after the restart")
                    to_restart += spawned - killed
                    to_result += time.monotonic() - spawned

            def ended() -> bool:
                return bool(http.get(f"/v1/batches/{batch_id}").json()["status"] in TERMINAL)

            wait(ended, "the batch to end")
            seconds = time.monotonic() - start
            problems = check(http, batch_id, n, restarts, 3 if kills else 0)
            kind = "3x SIGKILL" if kills else "undisturbed"
            return Run(kind, seconds, restarts, to_restart, to_result, problems)
        finally:
            db.dispose()


def check(http: httpx.Client, batch_id: str, n: int, restarts: int, kills: int) -> list[str]:
    """What is wrong with the finished batch (empty when nothing is)."""
    problems = []
    b = http.get(f"/v1/batches/{batch_id}").json()
    if b["status"] != "completed" or b["request_counts"] != {"total": n, "completed": n,
                                                             "failed": 0}:  # fmt: skip
        problems.append(f"batch {b['status']} {b['request_counts']}")
    out = http.get(f"/v1/files/{b['output_file_id']}/content") if b["output_file_id"] else None
    ids = Counter(json.loads(x)["custom_id"] for x in out.text.splitlines() if x) if out else {}
    missing = n - len(set(ids) & {f"r{i}" for i in range(n)})
    twice = sum(1 for c in ids.values() if c > 1)
    if missing or twice or len(ids) != n:
        problems.append(f"{missing} custom_ids missing, {twice} more than once")
    if restarts != kills:
        problems.append(f"{restarts} worker restarts, expected {kills}")
    return problems


def report(runs: list[Run], n: int, backend: str, step: float) -> str:
    """The printed table."""
    calm = [r.seconds for r in runs if r.kind == "undisturbed"]
    hit = [r.seconds for r in runs if r.kind != "undisturbed"]
    lines = [
        f"Crashes: {n:,} requests (sim engine, 16 tokens at {step * 1000:g} ms a step, 64 slots),",
        f"{backend}, embedded Redis, supervised stack. Disturbed runs SIGKILL the worker at",
        "20/40/60 % succeeded; the supervisor restarts it. Seconds: POST /v1/batches to completed.",
        "'to restart': kill to new process (the supervisor's backoff); 'to result': new process to",
        "its first result (start-up); both summed over the kills; 'net': seconds less both.",
        "",
        f"{'run':<5}{'kind':<14}{'seconds':>9}{'restarts':>10}{'to restart':>12}"
        f"{'to result':>11}{'net':>8}  checks",
    ]
    for i, r in enumerate(runs, 1):
        ok = "every custom_id once, none failed" if not r.problems else "; ".join(r.problems)
        lines.append(
            f"{i:<5}{r.kind:<14}{r.seconds:>9.1f}{r.restarts:>10}{r.to_restart:>11.1f}s"
            f"{r.to_result:>10.1f}s{r.seconds - r.to_restart - r.to_result:>7.1f}s  {ok}"
        )
    pairs = [h / c for c, h in zip(calm, hit, strict=False)]
    lines += [
        "",
        f"undisturbed: mean {statistics.mean(calm):.1f} s; disturbed: mean "
        f"{statistics.mean(hit):.1f} s",
        f"disturbed / undisturbed: {statistics.mean(hit) / statistics.mean(calm):.2f}x "
        f"(per pair: {', '.join(f'{p:.2f}x' for p in pairs)}; target <= 1.30x)",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Alternate undisturbed and disturbed runs, print the table; exit 1 if a check failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000, help="batch lines")
    ap.add_argument("--pairs", type=int, default=3, help="undisturbed + disturbed pairs")
    ap.add_argument("--decode-step", type=float, default=0.001, help="sim seconds per token step")
    env_pg = os.environ.get("SLUICE_TEST_DATABASE_URL")
    ap.add_argument(
        "--postgres",
        nargs="?",
        const=env_pg or LOCAL_PG,
        default=None,
        metavar="URL",
        help="run on a scratch PostgreSQL database (default server: SLUICE_TEST_DATABASE_URL,"
        " else the local one); SQLite without it",
    )
    args = ap.parse_args()
    backend = "postgres" if args.postgres else "sqlite"
    data = batch_file(args.requests)
    env = {**SIM_ENV, "SLUICE_SIM_DECODE_STEP": str(args.decode_step)}
    runs: list[Run] = []
    for pair in range(args.pairs):
        for kills in (False, True):
            label = "3x SIGKILL" if kills else "undisturbed"
            print(f"pair {pair + 1}/{args.pairs}: {label} ...", flush=True)
            runs.append(run(args.requests, data, kills, backend, args.postgres or "", env))
            print(f"  {runs[-1].seconds:.1f} s {'; '.join(runs[-1].problems)}", flush=True)
    text = report(runs, args.requests, backend, args.decode_step)
    print()
    print(text, end="")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"faults-{backend}.txt").write_text(text)
    print(f"wrote {OUT / f'faults-{backend}.txt'}")
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
