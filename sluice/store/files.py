"""Files: read, list and delete them; read input lines and request rows page by page."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from sqlalchemy import RowMapping, delete, func, select, update

from sluice.db import Database
from sluice.errors import Conflict, InvalidInput, NotFound
from sluice.models import QUEUED, RUNNING, TERMINAL_BATCH, batches, file_lines, files, requests
from sluice.store.owners import owned

PAGE = 2000
PURPOSES = ("batch", "batch_output", "batch_error")

# What a rendered result line needs from a request row.
RESULT_COLUMNS = (
    requests.c.id,
    requests.c.batch_id,
    requests.c.line_no,
    requests.c.custom_id,
    requests.c.model,
    requests.c.endpoint,
    requests.c.status,
    requests.c.output_text,
    requests.c.finish_reason,
    requests.c.error_code,
    requests.c.error_message,
    requests.c.prompt_tokens,
    requests.c.completion_tokens,
    requests.c.cached_tokens,
    requests.c.choices_json,
    requests.c.queued_at,
    requests.c.started_at,
    requests.c.finished_at,
)


def get_file(db: Database, file_id: str, owner: str | None) -> RowMapping:
    """One file row; NotFound if missing or someone else's (owner None: anyone's)."""
    with db.read() as conn:
        row = (
            conn.execute(select(files).where(files.c.id == file_id, owned(files.c.owner, owner)))
            .mappings()
            .one_or_none()
        )
    if row is None:
        raise NotFound("file", file_id)
    return row


def list_files(
    db: Database,
    owner: str | None,
    *,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = 10_000,
    order: str = "desc",
) -> list[RowMapping]:
    """Files by created_at (then id), up to limit + 1 rows so the caller can tell has_more."""
    c = files.c
    q = select(files).where(owned(c.owner, owner))
    if purpose is not None:
        q = q.where(c.purpose == purpose)
    desc = order == "desc"
    if after:
        with db.read() as conn:
            cursor = conn.execute(
                select(c.created_at).where(c.id == after, owned(c.owner, owner))
            ).scalar()
        if cursor is None:
            raise InvalidInput(f"no file with id {after!r}", param="after")
        if desc:
            q = q.where((c.created_at < cursor) | ((c.created_at == cursor) & (c.id < after)))
        else:
            q = q.where((c.created_at > cursor) | ((c.created_at == cursor) & (c.id > after)))
    keys = (c.created_at.desc(), c.id.desc()) if desc else (c.created_at.asc(), c.id.asc())
    with db.read() as conn:
        return list(conn.execute(q.order_by(*keys).limit(limit + 1)).mappings().all())


def delete_file(db: Database, file_id: str, owner: str | None) -> None:
    """Delete a file and its lines; Conflict while an unfinished batch still reads it."""
    with db.write() as conn:
        found = conn.execute(
            select(files.c.id).where(files.c.id == file_id, owned(files.c.owner, owner))
        ).scalar()
        if found is None:
            raise NotFound("file", file_id)
        busy = conn.execute(
            select(batches.c.id)
            .where(batches.c.input_file_id == file_id, batches.c.status.not_in(TERMINAL_BATCH))
            .limit(1)
        ).scalar()
        if busy is not None:
            raise Conflict(f"file {file_id} is the input of batch {busy}, which has not finished")
        # Explicit, rather than relying on ON DELETE CASCADE: SQLite enforces foreign
        # keys only on connections that turned them on.
        conn.execute(delete(file_lines).where(file_lines.c.file_id == file_id))
        conn.execute(delete(files).where(files.c.id == file_id))


def record_bytes(db: Database, file_id: str, size: int) -> None:
    """Store a rendered file's measured size (once: its content no longer changes)."""
    with db.write() as conn:
        conn.execute(
            update(files).where(files.c.id == file_id, files.c.bytes.is_(None)).values(bytes=size)
        )


def input_line_pages(db: Database, file_id: str, page: int = PAGE) -> Iterator[list[str | None]]:
    """An input file's raw lines in order, a page at a time (None: a line kept without text)."""
    last = 0
    while True:
        # One short read per page: a slow download must not pin a connection or a snapshot.
        with db.read() as conn:
            rows = conn.execute(
                select(file_lines.c.line_no, file_lines.c.raw)
                .where(file_lines.c.file_id == file_id, file_lines.c.line_no > last)
                .order_by(file_lines.c.line_no)
                .limit(page)
            ).all()
        if not rows:
            return
        last = rows[-1].line_no
        yield [r.raw for r in rows]
        if len(rows) < page:
            return


def request_page(
    db: Database,
    batch_id: str,
    statuses: Sequence[str] | None = None,
    after: tuple[int, int] | None = None,
    limit: int = PAGE,
) -> list[RowMapping]:
    """Up to `limit` requests of a batch by (line_no, id), after the given key."""
    c = requests.c
    q = select(*RESULT_COLUMNS).where(c.batch_id == batch_id)
    if statuses is not None:
        q = q.where(c.status.in_(list(statuses)))
    if after is not None:
        line, rid = after
        q = q.where((c.line_no > line) | ((c.line_no == line) & (c.id > rid)))
    with db.read() as conn:
        return list(conn.execute(q.order_by(c.line_no, c.id).limit(limit)).mappings().all())


def complete_through_line(db: Database, batch_id: str) -> int:
    """The largest line number up to which every request of the batch has ended (-1: none).

    Results arrive in finishing order, not line order: a client resuming after the last line
    it saw would miss an earlier line that ends later. Every line up to this one is final.
    """
    c = requests.c
    with db.read() as conn:
        first_open = conn.execute(
            select(c.line_no)
            .where(c.batch_id == batch_id, c.status.in_((QUEUED, RUNNING)))
            .order_by(c.line_no)
            .limit(1)
        ).scalar()
        if first_open is not None:
            return int(first_open) - 1
        last = conn.execute(select(func.max(c.line_no)).where(c.batch_id == batch_id)).scalar()
    return -1 if last is None else int(last)


def request_pages(
    db: Database,
    batch_id: str,
    statuses: Sequence[str] | None = None,
    after_line: int | None = None,
    page: int = PAGE,
) -> Iterator[list[RowMapping]]:
    """Every request of a batch (optionally only some statuses) in pages, by line number."""
    key: tuple[int, int] | None = None if after_line is None else (after_line, 2**62)
    while True:
        rows = request_page(db, batch_id, statuses, key, page)
        if not rows:
            return
        last = rows[-1]
        key = (int(last["line_no"]), int(last["id"]))
        yield rows
        if len(rows) < page:
            return
