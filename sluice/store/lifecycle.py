"""Batch status transitions driven by request outcomes: counting, finalizing, output files."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from sluice.ids import new_file_id, unix
from sluice.models import (
    B_CANCELLED,
    B_EXPIRED,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    IN_PROGRESS,
    SUCCEEDED,
    batches,
    files,
)
from sluice.store import deliveries

# Output and error files live as long as OpenAI keeps them: 30 days.
OUTPUT_TTL = 30 * 86400


@dataclass
class Outcome:
    """One request's end, as the batch counters see it."""

    batch_id: str
    status: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Tally:
    """Per-batch sums of outcomes."""

    completed: int = 0
    failed: int = 0
    dropped: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


def tally(outcomes: Iterable[Outcome]) -> dict[str, Tally]:
    """Sum outcomes per batch."""
    out: dict[str, Tally] = defaultdict(Tally)
    for o in outcomes:
        t = out[o.batch_id]
        if o.status == SUCCEEDED:
            t.completed += 1
        elif o.status == FAILED:
            t.failed += 1
        elif o.status in (CANCELLED, EXPIRED):
            t.dropped += 1
        t.input_tokens += o.prompt_tokens
        t.output_tokens += o.completion_tokens
        t.cached_tokens += o.cached_tokens
    return out


def account(conn: Connection, tallies: dict[str, Tally]) -> list[str]:
    """Add tallies to their batches; finalize the ones now done. Returns finished batch ids."""
    finished = []
    # A fixed order keeps two writers from locking the same batches in opposite orders.
    for batch_id in sorted(tallies):
        t = tallies[batch_id]
        row = conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(
                completed=batches.c.completed + t.completed,
                failed=batches.c.failed + t.failed,
                dropped=batches.c.dropped + t.dropped,
                input_tokens=batches.c.input_tokens + t.input_tokens,
                output_tokens=batches.c.output_tokens + t.output_tokens,
                cached_tokens=batches.c.cached_tokens + t.cached_tokens,
            )
            .returning(
                batches.c.total,
                batches.c.completed,
                batches.c.failed,
                batches.c.dropped,
                batches.c.status,
            )
        ).one_or_none()
        if row is None:
            continue
        total, completed, failed, dropped, status = row
        if completed + failed + dropped >= total and status in (IN_PROGRESS, CANCELLING):
            finalize(conn, batch_id, COMPLETED if status == IN_PROGRESS else B_CANCELLED)
            finished.append(batch_id)
    return finished


def finalize(conn: Connection, batch_id: str, status: str) -> None:
    """Move a batch to its end status and register its output and error files."""
    b = conn.execute(
        select(
            batches.c.owner,
            batches.c.completed,
            batches.c.failed,
            batches.c.dropped,
            batches.c.total,
            batches.c.kind,
            batches.c.webhook_url,
            batches.c.output_expires_after,
        ).where(batches.c.id == batch_id)
    ).one()
    ttl = b.output_expires_after or OUTPUT_TTL
    now = unix()
    values: dict[str, object] = {"status": status}
    if status == COMPLETED:
        values.update(finalizing_at=now, completed_at=now)
    elif status == B_CANCELLED:
        values.update(cancelled_at=now)
    elif status == B_EXPIRED:
        values.update(expired_at=now)
    unfinished_expired = status == B_EXPIRED and b.completed + b.failed + b.dropped < b.total
    if b.kind == "batch":
        if b.completed:
            values["output_file_id"] = _result_file(
                conn, batch_id, b.owner, "batch_output", now, ttl
            )
        if b.failed or b.dropped or unfinished_expired:
            values["error_file_id"] = _result_file(conn, batch_id, b.owner, "batch_error", now, ttl)
    conn.execute(update(batches).where(batches.c.id == batch_id).values(**values))
    if b.webhook_url:
        # Same transaction as the end status: the event exists exactly when the end does.
        deliveries.enqueue(conn, batch_id, b.kind, status, b.owner, b.webhook_url)


def _result_file(
    conn: Connection, batch_id: str, owner: str, purpose: str, now: int, ttl: int
) -> str:
    file_id = new_file_id()
    suffix = "output" if purpose == "batch_output" else "error"
    conn.execute(
        insert(files).values(
            id=file_id,
            owner=owner,
            purpose=purpose,
            filename=f"{batch_id}_{suffix}.jsonl",
            bytes=None,
            line_count=0,
            bad_lines=0,
            batch_id=batch_id,
            created_at=now,
            expires_at=now + ttl,
        )
    )
    return file_id
