"""Creating, reading and cancelling batches and single jobs."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    RowMapping,
    case,
    func,
    insert,
    literal,
    select,
    text,
    update,
)

from sluice.db import Database
from sluice.errors import Conflict, InvalidInput, NotFound
from sluice.ids import new_batch_id, new_job_id, unix
from sluice.ids import now as clock
from sluice.models import (
    B_CANCELLED,
    B_FAILED,
    BULK,
    CANCELLED,
    CANCELLING,
    IN_PROGRESS,
    INTERACTIVE,
    QUEUED,
    VALIDATING,
    batches,
    file_lines,
    files,
    requests,
)
from sluice.store import deliveries
from sluice.store.lifecycle import Outcome, account, finalize, tally
from sluice.store.owners import owned

WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}
MAX_LISTED_ERRORS = 1000
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Bounds the digits before any arithmetic: "99999999999999999999h" is refused, not multiplied.
WINDOW_RE = re.compile(r"[1-9][0-9]{0,6}[smhd]")
DEFAULT_MAX_WINDOW = 7 * 86400


def window_seconds(window: str, max_seconds: int = DEFAULT_MAX_WINDOW) -> int:
    """Seconds in a completion window such as '24h', '90m' or '7d', at most max_seconds."""
    seconds = WINDOWS.get(window)
    if seconds is None and WINDOW_RE.fullmatch(window):
        seconds = int(window[:-1]) * UNITS[window[-1]]
    if seconds is None:
        raise InvalidInput(
            "completion_window must look like 24h, 90m or 7d",
            param="completion_window",
            code="invalid_value",
        )
    if seconds > max_seconds:
        raise InvalidInput(
            f"completion_window is at most {max_seconds} seconds here ({window} is {seconds})",
            param="completion_window",
            code="invalid_value",
        )
    return seconds


def count_queued(db: Database, models: list[str], cap: int) -> int:
    """Queued requests of these models, counted up to cap (cost bounded by cap, on the index)."""
    q = requests.c
    inner = select(literal(1)).where(q.model.in_(models), q.status == QUEUED).limit(cap).subquery()
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(inner)).scalar_one())


@dataclass
class Created:
    """A committed batch and the request ids to publish."""

    batch_id: str
    status: str
    model: str
    priority: int
    request_ids: list[int]


def _line_errors(
    conn: Connection, file_id: str, endpoint: str, accepted: list[str]
) -> list[dict[str, Any]]:
    """Every problem in an input file, line by line, as OpenAI's error objects."""
    errs: list[dict[str, Any]] = []

    def add(code: str, line: int | None, message: str, param: str | None = None) -> None:
        errs.append({"code": code, "line": line, "message": message, "param": param})

    fl = file_lines.c
    for r in conn.execute(
        select(fl.line_no, fl.error_code, fl.error_message, fl.error_param)
        .where(fl.file_id == file_id, fl.error_code.is_not(None))
        .order_by(fl.line_no)
    ):
        add(r.error_code, r.line_no, r.error_message, r.error_param)
    for u in conn.execute(
        select(fl.line_no, fl.url)
        .where(fl.file_id == file_id, fl.error_code.is_(None), fl.url != endpoint)
        .order_by(fl.line_no)
    ):
        add(
            "invalid_url",
            u.line_no,
            f"line {u.line_no}: url {u.url} does not match the batch endpoint {endpoint}",
            "url",
        )
    for m in conn.execute(
        select(fl.line_no, fl.model)
        .where(fl.file_id == file_id, fl.error_code.is_(None), fl.model.not_in(accepted))
        .order_by(fl.line_no)
    ):
        add(
            "model_not_found",
            m.line_no,
            f"line {m.line_no}: model {m.model!r} is not "
            f"served here (available: {', '.join(accepted)})",
            "body.model",
        )
    models = (
        conn.execute(
            select(fl.model)
            .where(fl.file_id == file_id, fl.error_code.is_(None))
            .group_by(fl.model)
        )
        .scalars()
        .all()
    )
    if len(models) > 1:
        add(
            "mismatched_model",
            None,
            "all lines of a batch must use the same model; found "
            + ", ".join(sorted(m for m in models if m)),
            "body.model",
        )
    first = (
        select(fl.custom_id, func.min(fl.line_no).label("first"))
        .where(fl.file_id == file_id, fl.error_code.is_(None))
        .group_by(fl.custom_id)
        .having(func.count() > 1)
        .subquery()
    )
    for d in conn.execute(
        select(fl.line_no, fl.custom_id, first.c.first)
        .join(first, first.c.custom_id == fl.custom_id)
        .where(fl.file_id == file_id, fl.line_no > first.c.first)
        .order_by(fl.line_no)
    ):
        add(
            "duplicate_custom_id",
            d.line_no,
            f"line {d.line_no}: custom_id {d.custom_id!r} already used on line {d.first}",
            "custom_id",
        )
    errs.sort(key=lambda e: e["line"] or 0)
    return errs


def _refresh_statistics(db: Database, conn: Connection, table: str) -> None:
    """ANALYZE after a bulk insert (PostgreSQL): with stale statistics the planner takes a
    50,000-row file for a few rows and scans it on every claim (90 ms instead of 6 ms)."""
    if db.is_postgres:
        conn.execute(text(f"ANALYZE {table}"))


def _queue_order(prefix_order: bool) -> list[Any]:
    """The order a file's lines become requests (claims and messages follow request ids).

    Prefix order: lines grouped by their prompt's first 256 bytes, groups in order of first
    appearance (a file without shared prefixes keeps its line order), within a group by the
    rest of the prefix key (trie order: a shared document or few-shot block runs as one
    stretch; sluice/prefix.py). Costs a window and a sort over the file's lines.
    """
    fl = file_lines.c
    if not prefix_order:
        return [fl.line_no]
    first_crc = func.substr(fl.prefix_key, 1, 4)
    first_seen = func.min(fl.line_no).over(partition_by=first_crc)
    return [first_seen, fl.prefix_key, fl.line_no]


def create_batch(
    db: Database,
    *,
    owner: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    accepted_models: list[str],
    max_requests: int,
    webhook_url: str | None = None,
    max_window: int = DEFAULT_MAX_WINDOW,
    prefix_order: bool = True,
    aliases: Mapping[str, str] | None = None,
    output_expires_after: int | None = None,
) -> Created:
    """Check the whole input file, then queue every line as a request (one transaction).

    output_expires_after: seconds the output and error files live (None: 30 days).

    aliases (alias -> served model): lines naming an alias run as, and are stored as, its model.

    Request ids follow prefix order (see _queue_order), or line order without prefix_order.
    """
    window = window_seconds(completion_window, max_window)
    now = unix()
    batch_id = new_batch_id()
    with db.write() as conn:
        f = conn.execute(
            select(files.c.purpose, files.c.line_count).where(
                files.c.id == input_file_id, files.c.owner == owner
            )
        ).one_or_none()
        if f is None:
            raise NotFound("file", input_file_id)
        if f.purpose != "batch":
            raise InvalidInput(
                f"file {input_file_id} has purpose {f.purpose!r}, not 'batch'",
                param="input_file_id",
            )
        _refresh_statistics(db, conn, "file_lines")
        # File-level errors first: the list is cut at MAX_LISTED_ERRORS line errors.
        errs: list[dict[str, Any]] = []
        if f.line_count == 0:
            errs.append(
                {
                    "code": "empty_file",
                    "line": None,
                    "param": None,
                    "message": "the input file has no requests",
                }
            )
        if f.line_count > max_requests:
            errs.append(
                {
                    "code": "too_many_tasks",
                    "line": None,
                    "param": None,
                    "message": f"the file has {f.line_count} requests; the limit is {max_requests}",
                }
            )
        aliases = dict(aliases or {})
        errs += _line_errors(conn, input_file_id, endpoint, [*accepted_models, *aliases])
        model = (
            conn.execute(
                select(file_lines.c.model)
                .where(file_lines.c.file_id == input_file_id, file_lines.c.model.is_not(None))
                .limit(1)
            ).scalar()
            or ""
        )
        model = aliases.get(model, model)
        status = B_FAILED if errs else IN_PROGRESS
        conn.execute(
            insert(batches).values(
                id=batch_id,
                owner=owner,
                kind="batch",
                endpoint=endpoint,
                model=model,
                status=status,
                priority=BULK,
                input_file_id=input_file_id,
                completion_window=completion_window,
                metadata_json=json.dumps(metadata) if metadata else None,
                errors_json=json.dumps(errs[:MAX_LISTED_ERRORS]) if errs else None,
                webhook_url=webhook_url,
                output_expires_after=output_expires_after,
                created_at=now,
                expires_at=now + window,
                in_progress_at=None if errs else now,
                failed_at=now if errs else None,
                total=0 if errs else f.line_count,
            )
        )
        if errs:
            if webhook_url:
                deliveries.enqueue(conn, batch_id, "batch", B_FAILED, owner, webhook_url)
            return Created(batch_id, status, model, BULK, [])
        fl = file_lines.c
        conn.execute(
            insert(requests).from_select(
                [
                    "batch_id",
                    "file_id",
                    "line_no",
                    "custom_id",
                    "model",
                    "endpoint",
                    "priority",
                    "status",
                    "attempts",
                    "queued_at",
                    "prompt_tokens",
                    "completion_tokens",
                ],
                select(
                    literal(batch_id),
                    fl.file_id,
                    fl.line_no,
                    fl.custom_id,
                    case(aliases, value=fl.model, else_=fl.model) if aliases else fl.model,
                    fl.url,
                    literal(BULK),
                    literal(QUEUED),
                    literal(0),
                    literal(clock()),
                    literal(0),
                    literal(0),
                )
                .where(fl.file_id == input_file_id)
                .order_by(*_queue_order(prefix_order)),
            )
        )
        _refresh_statistics(db, conn, "requests")
        ids = (
            conn.execute(
                select(requests.c.id).where(requests.c.batch_id == batch_id).order_by(requests.c.id)
            )
            .scalars()
            .all()
        )
    return Created(batch_id, status, model, BULK, list(ids))


def create_job(
    db: Database,
    *,
    owner: str,
    endpoint: str,
    model: str,
    body: dict[str, Any],
    webhook_url: str | None = None,
    window_s: int = 86400,
) -> Created:
    """A single job: a batch of one request, interactive priority."""
    job_id = new_job_id()
    now = unix()
    with db.write() as conn:
        conn.execute(
            insert(batches).values(
                id=job_id,
                owner=owner,
                kind="job",
                endpoint=endpoint,
                model=model,
                status=IN_PROGRESS,
                priority=INTERACTIVE,
                completion_window="24h",
                webhook_url=webhook_url,
                created_at=now,
                in_progress_at=now,
                expires_at=now + window_s,
                total=1,
            )
        )
        rid = conn.execute(
            insert(requests)
            .values(
                batch_id=job_id,
                custom_id=job_id,
                body=json.dumps(body),
                model=model,
                endpoint=endpoint,
                priority=INTERACTIVE,
                status=QUEUED,
                attempts=0,
                queued_at=clock(),
                prompt_tokens=0,
                completion_tokens=0,
            )
            .returning(requests.c.id)
        ).scalar_one()
    return Created(job_id, IN_PROGRESS, model, INTERACTIVE, [rid])


def get_batch(db: Database, batch_id: str, owner: str | None, kind: str = "batch") -> RowMapping:
    """One batch (or job) row; NotFound if missing or someone else's (owner None: anyone's)."""
    with db.read() as conn:
        row = (
            conn.execute(
                select(batches).where(
                    batches.c.id == batch_id, owned(batches.c.owner, owner), batches.c.kind == kind
                )
            )
            .mappings()
            .one_or_none()
        )
    if row is None:
        raise NotFound(kind, batch_id)
    return row


def list_batches(
    db: Database, owner: str | None, after: str | None, limit: int
) -> list[RowMapping]:
    """Newest first, OpenAI-style cursor: batches created before `after` (owner None: all)."""
    q = select(batches).where(owned(batches.c.owner, owner), batches.c.kind == "batch")
    if after:
        with db.read() as conn:
            cursor = conn.execute(
                select(batches.c.created_at).where(
                    batches.c.id == after, owned(batches.c.owner, owner)
                )
            ).scalar()
        if cursor is None:
            raise InvalidInput(f"no batch with id {after!r}", param="after")
        q = q.where(
            (batches.c.created_at < cursor)
            | ((batches.c.created_at == cursor) & (batches.c.id < after))
        )
    q = q.order_by(batches.c.created_at.desc(), batches.c.id.desc()).limit(limit + 1)
    with db.read() as conn:
        return list(conn.execute(q).mappings().all())


def cancel_batch(db: Database, batch_id: str, owner: str | None, kind: str = "batch") -> bool:
    """Stop a batch: queued requests never run; running ones are aborted by their worker.

    Returns True when workers must be told to abort running requests.
    """
    with db.write() as conn:
        row = conn.execute(
            select(batches.c.status).where(
                batches.c.id == batch_id, owned(batches.c.owner, owner), batches.c.kind == kind
            )
        ).one_or_none()
        if row is None:
            raise NotFound(kind, batch_id)
        if row.status in (CANCELLING, B_CANCELLED):
            return False
        if row.status not in (VALIDATING, IN_PROGRESS):
            raise Conflict(f"{kind} {batch_id} is {row.status} and cannot be cancelled")
        conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(status=CANCELLING, cancelling_at=unix())
        )
        dropped = (
            conn.execute(
                update(requests)
                .where(requests.c.batch_id == batch_id, requests.c.status == QUEUED)
                .values(
                    status=CANCELLED,
                    error_code="batch_cancelled",
                    error_message="the batch was cancelled before this request ran",
                    finished_at=clock(),
                )
                .returning(requests.c.id)
            )
            .scalars()
            .all()
        )
        finished = account(conn, tally(Outcome(batch_id, CANCELLED) for _ in dropped))
        if not finished:
            # Nothing was queued and nothing counted: an empty batch ends at once.
            total = conn.execute(select(batches.c.total).where(batches.c.id == batch_id)).scalar()
            if total == 0:
                finalize(conn, batch_id, B_CANCELLED)
                finished = [batch_id]
    return not finished
