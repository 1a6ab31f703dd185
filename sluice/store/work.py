"""The worker's SQL: claim rows under a lease, write results as the lease holder, recover."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Connection,
    Select,
    and_,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from sluice.db import Database
from sluice.ids import now as clock
from sluice.ids import unix
from sluice.models import (
    B_EXPIRED,
    CANCELLED,
    CANCELLING,
    EXPIRED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    RUNNING,
    batches,
    file_lines,
    requests,
)
from sluice.store.lifecycle import Outcome, account, finalize, tally


@dataclass
class Claimed:
    """A request this worker now holds: what to run and how to render it."""

    id: int
    batch_id: str
    endpoint: str
    priority: int
    attempts: int
    crashes: int
    body: str  # a job's body JSON, or a file's whole input line (whose "body" to run)
    from_file: bool
    queued_at: float = 0.0  # when it was queued (the worker's time-in-queue metric)


def storable_text(text: str) -> str:
    """Output text as it is stored and streamed: without NUL, which PostgreSQL text cannot hold
    (a model may emit one; stored and streamed text must stay equal, or a stream ends in a
    stream_mismatch error)."""
    return text.replace("\x00", "") if "\x00" in text else text


@dataclass
class Result:
    """A finished request as the writer stores it."""

    id: int
    status: str  # succeeded | failed | cancelled
    output_text: str | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_at: float = 0.0
    cached_tokens: int = 0  # prompt tokens the engine's prefix cache served
    # n > 1 or logprobs: every choice as JSON (sluice.render reads it); None otherwise.
    choices_json: str | None = None


def _among(db: Database, column: Any, values: Sequence[int]) -> Any:
    """`column IN values`; on PostgreSQL one array parameter, so the statement text (and
    psycopg's parsed query cache) stays the same whatever the number of values."""
    if db.is_postgres:
        name = f"{column.name}_array"
        return column == any_(bindparam(name, list(values), type_=ARRAY(BigInteger)))
    return column.in_(list(values))


# PostgreSQL reads a file request's input line in the claim's own RETURNING (one round trip).
_input_line = (
    select(file_lines.c.raw)
    .where(file_lines.c.file_id == requests.c.file_id, file_lines.c.line_no == requests.c.line_no)
    .scalar_subquery()
    .label("raw")
)


def claim(db: Database, ids: Sequence[int], owner: str, lease_seconds: float) -> list[Claimed]:
    """Lease the still-queued rows among ids (named by a message); others are skipped."""
    if not ids:
        return []
    return _claim(db, _among(db, requests.c.id, ids), owner, lease_seconds)


def claim_next(
    db: Database,
    model: str,
    owner: str,
    lease_seconds: float,
    limit: int,
    priority: int,
    after: int = 0,
) -> list[Claimed]:
    """Lease the next queued rows of a model and priority, whichever message named them.

    Lets a worker serve a job whose message waits behind bulk messages, take work another
    worker holds messages for but has not claimed, and pick up rows whose message was lost.
    `after` skips ids below a mark: claimed rows leave dead index entries behind that every
    scan from the start would walk again.
    """
    pick = (
        select(requests.c.id)
        .where(
            requests.c.status == QUEUED,
            requests.c.model == model,
            requests.c.priority == priority,
            requests.c.id > after,
            requests.c.crashes == 0,
        )
        .order_by(requests.c.id)
        .limit(limit)
    )
    if db.is_postgres:
        # Two workers picking at once each get different rows instead of queueing on locks.
        pick = pick.with_for_update(skip_locked=True)
    return _claim(db, _picked(db, pick), owner, lease_seconds)


def _picked(db: Database, pick: Select[tuple[int]]) -> Any:
    """`id IN (pick)`, the pick run once. PostgreSQL may plan a LIMIT ... FOR UPDATE SKIP
    LOCKED subquery as the inner side of a nested loop and rescan it per row, skipping the
    rows it just updated each time: the claim then takes far more than its limit."""
    if db.is_postgres:
        picked = pick.cte("picked").prefix_with("MATERIALIZED")
        return requests.c.id.in_(select(picked.c.id))
    return requests.c.id.in_(pick.scalar_subquery())


def _claim(
    db: Database, which: Any, owner: str, lease_seconds: float, *, suspects: bool = False
) -> list[Claimed]:
    now = clock()
    # Suspects run only in isolation groups (claim_suspects), never beside ordinary work.
    crashed = requests.c.crashes > 0 if suspects else requests.c.crashes == 0
    with db.write() as conn:
        # status='queued' in the WHERE is the whole guard: a duplicate message or a second
        # worker finds nothing left to claim (PostgreSQL rechecks it after the row lock).
        rows = conn.execute(
            update(requests)
            .where(which, requests.c.status == QUEUED, crashed)
            .values(
                status=RUNNING,
                lease_owner=owner,
                lease_expires_at=now + lease_seconds,
                attempts=requests.c.attempts + 1,
                started_at=now,
            )
            .returning(
                requests.c.id,
                requests.c.batch_id,
                requests.c.endpoint,
                requests.c.priority,
                requests.c.attempts,
                requests.c.crashes,
                requests.c.body,
                requests.c.file_id,
                requests.c.line_no,
                requests.c.queued_at,
                *([_input_line] if db.is_postgres else []),
            )
        ).all()
        if db.is_postgres:
            lines = {(r.file_id, r.line_no): r.raw or "" for r in rows if r.body is None}
        else:
            lines = _input_lines(conn, [(r.file_id, r.line_no) for r in rows if r.body is None])
    return [
        Claimed(
            r.id,
            r.batch_id,
            r.endpoint,
            r.priority,
            r.attempts,
            r.crashes,
            r.body if r.body is not None else lines.get((r.file_id, r.line_no), ""),
            r.body is None,
            r.queued_at or 0.0,
        )
        # UPDATE ... RETURNING promises no order; id order is queue order (and prefix order).
        for r in sorted(rows, key=lambda r: r.id)
    ]


def _input_lines(conn: Connection, keys: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """SQLite: the raw input lines of file requests, by primary key, file by file."""
    by_file: dict[str, list[int]] = defaultdict(list)
    for file_id, line_no in keys:
        by_file[file_id].append(line_no)
    out: dict[tuple[str, int], str] = {}
    for file_id, line_nos in by_file.items():
        for line_no, raw in conn.execute(
            select(file_lines.c.line_no, file_lines.c.raw).where(
                file_lines.c.file_id == file_id, file_lines.c.line_no.in_(line_nos)
            )
        ):
            out[(file_id, line_no)] = raw or ""
    return out


# The results travel as one JSON parameter: psycopg dumps a list parameter element by element
# in Python, nine arrays of a few hundred values cost more than the statement itself.
_PG_WRITE = text("""
UPDATE requests AS r SET
  status = v.status, output_text = v.output_text, finish_reason = v.finish_reason,
  error_code = v.error_code, error_message = v.error_message,
  prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens,
  cached_tokens = v.cached_tokens, finished_at = v.finished_at, lease_expires_at = NULL,
  choices_json = v.choices_json
FROM json_to_recordset(CAST(:rows AS json)) AS v(
  id bigint, status text, output_text text, finish_reason text, error_code text,
  error_message text, prompt_tokens int, completion_tokens int, cached_tokens int,
  finished_at float8, choices_json text)
WHERE r.id = v.id AND r.lease_owner = :owner AND r.status = 'running'
RETURNING r.id, r.batch_id
""")

_FIELDS = (
    "status",
    "output_text",
    "finish_reason",
    "error_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "finished_at",
    "choices_json",
)


def write_results(db: Database, owner: str, results: Sequence[Result]) -> list[str]:
    """Store results in one transaction, only for rows this worker still holds.

    Returns the ids of batches that finished with this write.
    """
    if not results:
        return []
    with db.write() as conn:
        if db.is_postgres:
            # One statement: the lease check, the write and the list of rows written.
            rows = orjson.dumps(results).decode()
            held = {
                row[0]: row[1] for row in conn.execute(_PG_WRITE, {"owner": owner, "rows": rows})
            }
        else:
            held = _write_sqlite(conn, owner, results)
        outcomes = [
            Outcome(held[r.id], r.status, r.prompt_tokens, r.completion_tokens, r.cached_tokens)
            for r in results
            if r.id in held
        ]
        return account(conn, tally(outcomes)) if outcomes else []


def _write_sqlite(conn: Connection, owner: str, results: Sequence[Result]) -> dict[int, str]:
    """SQLite: find the rows still held (the write lock is already ours), then update them."""
    held = {
        row[0]: row[1]
        for row in conn.execute(
            select(requests.c.id, requests.c.batch_id).where(
                requests.c.id.in_([r.id for r in results]),
                requests.c.lease_owner == owner,
                requests.c.status == RUNNING,
            )
        )
    }
    mine = [r for r in results if r.id in held]
    if mine:
        conn.execute(
            update(requests)
            .where(requests.c.id == bindparam("rid"))
            .values(**{f: bindparam(f) for f in _FIELDS}, lease_expires_at=None),
            [{"rid": r.id, **{f: getattr(r, f) for f in _FIELDS}} for r in mine],
        )
    return held


def requeue_expired_leases(
    db: Database, max_attempts: int
) -> tuple[list[tuple[int, str, int]], list[str]]:
    """Rows whose lease ran out (their worker died or stalled) go back to the queue, charged
    one crash each, or fail as poison after max_attempts crashes.

    Returns (requeued (id, model, priority), finished batch ids).
    """
    # Naming the models lets the (model, status, ...) index find running rows.
    active = select(batches.c.model).where(batches.c.status.in_((IN_PROGRESS, CANCELLING)))
    expired = and_(
        requests.c.model.in_(active.distinct().scalar_subquery()),
        requests.c.status == RUNNING,
        requests.c.lease_expires_at < clock(),
    )
    return _requeue(db, expired, max_attempts, charge=True)


def release(
    db: Database, owner: str, ids: Sequence[int], max_attempts: int, *, charge: bool
) -> tuple[list[tuple[int, str, int]], list[str]]:
    """Give back rows this worker holds: charged when they were in an engine that crashed,
    uncharged when they never reached it or a shutdown stopped them."""
    if not ids:
        return [], []
    mine = and_(
        _among(db, requests.c.id, ids),
        requests.c.lease_owner == owner,
        requests.c.status == RUNNING,
    )
    return _requeue(db, mine, max_attempts, charge=charge)


def release_owner(
    db: Database, owner: str, max_attempts: int
) -> tuple[list[tuple[int, str, int]], list[str]]:
    """Give back every row a dead worker held, at once (its supervisor saw it die)."""
    mine = and_(requests.c.lease_owner == owner, requests.c.status == RUNNING)
    return _requeue(db, mine, max_attempts, charge=True)


def _requeue(
    db: Database, which: Any, max_attempts: int, *, charge: bool
) -> tuple[list[tuple[int, str, int]], list[str]]:
    """Requeue the rows `which` selects; a charged row gains a crash and may fail as poison."""
    now = clock()
    cleared: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
    with db.write() as conn:
        cancelling = select(batches.c.id).where(batches.c.status == CANCELLING)
        dropped = (
            conn.execute(
                update(requests)
                .where(which, requests.c.batch_id.in_(cancelling))
                .values(
                    status=CANCELLED,
                    error_code="batch_cancelled",
                    error_message="the batch was cancelled",
                    finished_at=now,
                    **cleared,
                )
                .returning(requests.c.batch_id)
            )
            .scalars()
            .all()
        )
        poisoned: Sequence[str] = []
        if charge:
            # Suspects run in ever smaller groups and, one crash before the limit, alone: a
            # row reaching the limit crashed its engine by itself.
            poisoned = (
                conn.execute(
                    update(requests)
                    .where(which, requests.c.crashes + 1 >= max_attempts)
                    .values(
                        status=FAILED,
                        crashes=requests.c.crashes + 1,
                        error_code="max_attempts_exceeded",
                        error_message=f"the engine failed {max_attempts} times while running "
                        "this request, the last time with this request alone in it",
                        finished_at=now,
                        **cleared,
                    )
                    .returning(requests.c.batch_id)
                )
                .scalars()
                .all()
            )
        requeued = conn.execute(
            update(requests)
            .where(which)
            .values(
                status=QUEUED,
                queued_at=now,
                crashes=requests.c.crashes + (1 if charge else 0),
                **cleared,
            )
            .returning(requests.c.id, requests.c.model, requests.c.priority)
        ).all()
        outcomes = [Outcome(b, CANCELLED) for b in dropped]
        outcomes += [Outcome(b, FAILED) for b in poisoned]
        finished = account(conn, tally(outcomes)) if outcomes else []
    return [(r.id, r.model, r.priority) for r in requeued], finished


def suspect_level(db: Database, model: str) -> int:
    """The highest crash count among this model's queued rows (0: no suspects)."""
    with db.read() as conn:
        level = conn.execute(
            select(func.max(requests.c.crashes)).where(
                requests.c.model == model, requests.c.status == QUEUED, requests.c.crashes > 0
            )
        ).scalar()
    return int(level or 0)


def claim_suspects(
    db: Database, model: str, owner: str, lease_seconds: float, limit: int, level: int
) -> list[Claimed]:
    """Lease up to `limit` queued suspects with this crash count (an isolation group)."""
    pick = (
        select(requests.c.id)
        .where(
            requests.c.model == model,
            requests.c.status == QUEUED,
            requests.c.crashes == level,
        )
        .order_by(requests.c.id)
        .limit(limit)
    )
    if db.is_postgres:
        pick = pick.with_for_update(skip_locked=True)
    return _claim(db, _picked(db, pick), owner, lease_seconds, suspects=True)


def expire_batches(db: Database) -> list[str]:
    """End batches whose completion window passed; unfinished requests get batch_expired."""
    now = unix()
    done = []
    with db.write() as conn:
        due = (
            conn.execute(
                select(batches.c.id).where(
                    batches.c.status == IN_PROGRESS,
                    batches.c.expires_at.is_not(None),
                    batches.c.expires_at <= now,
                )
            )
            .scalars()
            .all()
        )
        for batch_id in due:
            n = conn.execute(
                update(requests)
                .where(requests.c.batch_id == batch_id, requests.c.status.in_((QUEUED, RUNNING)))
                .values(
                    status=EXPIRED,
                    error_code="batch_expired",
                    error_message="This request could not be executed before the "
                    "completion window expired.",
                    finished_at=clock(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            ).rowcount
            conn.execute(
                update(batches)
                .where(batches.c.id == batch_id)
                .values(dropped=batches.c.dropped + n)
            )
            finalize(conn, batch_id, B_EXPIRED)
            done.append(batch_id)
    return done


def cancelled_among(conn: Connection, ids: Sequence[int]) -> list[int]:
    """Which of these running requests belong to batches being cancelled."""
    return list(
        conn.execute(
            select(requests.c.id).where(
                requests.c.id.in_(list(ids)),
                requests.c.batch_id.in_(select(batches.c.id).where(batches.c.status == CANCELLING)),
            )
        )
        .scalars()
        .all()
    )


def renew_leases(db: Database, ids: Sequence[int], owner: str, lease_seconds: float) -> int:
    """Extend this worker's leases on rows still running (long generations, long queues)."""
    with db.write() as conn:
        return conn.execute(
            update(requests)
            .where(
                requests.c.id.in_(list(ids)),
                requests.c.lease_owner == owner,
                requests.c.status == RUNNING,
            )
            .values(lease_expires_at=clock() + lease_seconds)
        ).rowcount
