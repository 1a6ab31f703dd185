"""Read-only counts for metrics and `sluice status`: the queue, active and recent batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select

from sluice.db import Database
from sluice.models import (
    CANCELLING,
    FINALIZING,
    IN_PROGRESS,
    QUEUED,
    RUNNING,
    VALIDATING,
    batches,
    requests,
)

ACTIVE_BATCH = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)


@dataclass(frozen=True)
class QueueCount:
    """Requests of one model, priority and live status (queued or running)."""

    model: str
    priority: int
    status: str
    count: int


def queue_counts(db: Database, models: Sequence[str]) -> list[QueueCount]:
    """Queued and running requests by model and priority.

    On the claim index (model, status, priority, id): the cost is the number of live rows,
    not the table (finished requests are never visited).
    """
    if not models:
        return []
    q = requests.c
    stmt = (
        select(q.model, q.priority, q.status, func.count())
        .where(q.model.in_(list(models)), q.status.in_((QUEUED, RUNNING)))
        .group_by(q.model, q.priority, q.status)
    )
    with db.read() as conn:
        return [QueueCount(m, int(p), s, int(n)) for m, p, s, n in conn.execute(stmt)]


def active_batch_counts(db: Database) -> dict[str, int]:
    """Batches and jobs not yet finished, by status (on the status index)."""
    b = batches.c
    stmt = select(b.status, func.count()).where(b.status.in_(ACTIVE_BATCH)).group_by(b.status)
    with db.read() as conn:
        return {str(s): int(n) for s, n in conn.execute(stmt)}


@dataclass(frozen=True)
class BatchLine:
    """One batch as `sluice status` lists it."""

    id: str
    model: str
    status: str
    total: int
    completed: int
    failed: int
    output_tokens: int
    created_at: int


def recent_batches(db: Database, limit: int) -> list[BatchLine]:
    """Unfinished batches first (newest first), then the newest finished ones, up to limit.

    Jobs (batches of one) are left out: a busy deployment has millions.
    """
    b = batches.c
    cols = (b.id, b.model, b.status, b.total, b.completed, b.failed, b.output_tokens, b.created_at)
    order = (b.created_at.desc(), b.id.desc())
    with db.read() as conn:
        active = conn.execute(
            select(*cols)
            .where(b.status.in_(ACTIVE_BATCH), b.kind == "batch")
            .order_by(*order)
            .limit(limit)
        ).all()
        rows = list(active)
        if len(rows) < limit:
            rows += conn.execute(
                select(*cols)
                .where(b.status.not_in(ACTIVE_BATCH), b.kind == "batch")
                .order_by(*order)
                .limit(limit - len(rows))
            ).all()
    return [
        BatchLine(
            r.id,
            r.model,
            r.status,
            r.total,
            r.completed,
            r.failed,
            r.output_tokens or 0,
            r.created_at,
        )
        for r in rows
    ]
