"""Webhook deliveries: created with the event (same transaction), claimed under a lease by a
sender, logged attempt by attempt."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, RowMapping, delete, insert, select, update

from sluice.db import Database
from sluice.ids import now as clock
from sluice.ids import unix
from sluice.models import batches, requests, webhook_attempts, webhook_deliveries, webhook_endpoints
from sluice.render import job_object
from sluice.store.files import RESULT_COLUMNS
from sluice.webhooks.events import batch_event_type, job_event_type, new_event_id, payload


class DeliveryStatus(StrEnum):
    """Where a delivery stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Outcome(StrEnum):
    """What one attempt led to."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    DISABLED = "disabled"  # the endpoint answered 410 Gone, or had before


def enqueue(conn: Connection, batch_id: str, kind: str, status: str, owner: str, url: str) -> str:
    """Record the event of a batch or job that just ended with `status`; returns its id."""
    event_id = new_event_id()
    now = unix()
    if kind == "job":
        b = conn.execute(select(batches).where(batches.c.id == batch_id)).mappings().one()
        req = (
            conn.execute(select(*RESULT_COLUMNS).where(requests.c.batch_id == batch_id).limit(1))
            .mappings()
            .one_or_none()
        )
        job = job_object(b, req)
        body = payload(event_id, job_event_type(job["status"]), now, batch_id, job)
        event = job_event_type(job["status"])
    else:
        event = batch_event_type(status)
        body = payload(event_id, event, now, batch_id)
    conn.execute(
        insert(webhook_deliveries).values(
            id=event_id,
            batch_id=batch_id,
            owner=owner,
            event_type=str(event),
            url=url,
            payload=body,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=clock(),
            created_at=clock(),
        )
    )
    return event_id


@dataclass
class Due:
    """A delivery a sender now holds: what to send and how long it may keep trying."""

    id: str
    url: str
    payload: str
    attempts: int
    created_at: float


def claim(db: Database, owner: str, limit: int, lease_seconds: float) -> list[Due]:
    """Lease up to `limit` pending deliveries that are due and held by no live lease."""
    d = webhook_deliveries.c
    now = clock()
    free = (d.lease_expires_at.is_(None)) | (d.lease_expires_at < now)
    pick = (
        select(d.id)
        .where(d.status == DeliveryStatus.PENDING, d.next_attempt_at <= now, free)
        .order_by(d.next_attempt_at)
        .limit(limit)
    )
    if db.is_postgres:
        # Two senders picking at once take different rows rather than queueing on locks.
        pick = pick.with_for_update(skip_locked=True)
        picked = pick.cte("picked").prefix_with("MATERIALIZED")
        which = d.id.in_(select(picked.c.id))
    else:
        which = d.id.in_(pick.scalar_subquery())
    with db.write() as conn:
        # The WHERE repeats the guard: PostgreSQL rechecks it after the row lock, so a row
        # another sender leased meanwhile is not leased twice.
        rows = conn.execute(
            update(webhook_deliveries)
            .where(which, d.status == DeliveryStatus.PENDING, free)
            .values(lease_owner=owner, lease_expires_at=now + lease_seconds)
            .returning(d.id, d.url, d.payload, d.attempts, d.created_at)
        ).all()
    return [Due(r.id, r.url, r.payload, r.attempts, r.created_at) for r in rows]


@dataclass
class Attempt:
    """One attempt's result, as the log keeps it."""

    started_at: float
    duration_ms: int
    status_code: int | None
    error: str | None
    outcome: Outcome
    next_attempt_at: float | None = None  # when retrying


def url_hash(url: str) -> str:
    """The key of an endpoint row."""
    return hashlib.sha256(url.encode()).hexdigest()


def disabled_reason(db: Database, url: str) -> str | None:
    """Why a URL gets nothing any more (it answered 410 Gone), or None."""
    with db.read() as conn:
        return conn.execute(
            select(webhook_endpoints.c.reason).where(webhook_endpoints.c.url_hash == url_hash(url))
        ).scalar()


def record(db: Database, owner: str, due: Due, url: str, attempt: Attempt) -> bool:
    """Log an attempt and move the delivery on, if this sender still holds it.

    A 410 also disables the URL: every delivery to it ends without being sent.
    Returns False when the lease was lost (another sender took the row over).
    """
    d = webhook_deliveries.c
    final = attempt.outcome != Outcome.RETRYING
    status = (
        DeliveryStatus.SUCCEEDED
        if attempt.outcome == Outcome.SUCCEEDED
        else DeliveryStatus.FAILED
        if final
        else DeliveryStatus.PENDING
    )
    values: dict[str, Any] = {
        "status": status,
        "attempts": d.attempts + 1,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_status_code": attempt.status_code,
        "last_error": attempt.error,
    }
    if final:
        values["finished_at"] = clock()
    else:
        values["next_attempt_at"] = attempt.next_attempt_at
    with db.write() as conn:
        held = conn.execute(
            update(webhook_deliveries)
            .where(d.id == due.id, d.lease_owner == owner, d.status == DeliveryStatus.PENDING)
            .values(**values)
        ).rowcount
        if not held:
            return False
        conn.execute(
            insert(webhook_attempts).values(
                delivery_id=due.id,
                attempt=due.attempts + 1,
                started_at=attempt.started_at,
                duration_ms=attempt.duration_ms,
                status_code=attempt.status_code,
                error=attempt.error,
                outcome=attempt.outcome,
            )
        )
        if attempt.outcome == Outcome.DISABLED and attempt.status_code == 410:
            _disable(conn, url, attempt.error or "410 Gone")
    return True


def _disable(conn: Connection, url: str, reason: str) -> None:
    key = url_hash(url)
    e = webhook_endpoints.c
    if conn.execute(select(e.url_hash).where(e.url_hash == key)).first() is None:
        conn.execute(
            insert(webhook_endpoints).values(
                url_hash=key, url=url, disabled_at=unix(), reason=reason
            )
        )


def deliveries_of(db: Database, batch_id: str) -> list[tuple[RowMapping, list[RowMapping]]]:
    """A batch's or job's deliveries, oldest first, each with its attempts (the log)."""
    d, a = webhook_deliveries.c, webhook_attempts.c
    with db.read() as conn:
        rows = (
            conn.execute(
                select(webhook_deliveries)
                .where(d.batch_id == batch_id)
                .order_by(d.created_at, d.id)
            )
            .mappings()
            .all()
        )
        ids: Sequence[str] = [r["id"] for r in rows]
        attempts = (
            conn.execute(select(webhook_attempts).where(a.delivery_id.in_(ids)).order_by(a.id))
            .mappings()
            .all()
            if ids
            else []
        )
    by_delivery: dict[str, list[RowMapping]] = {}
    for att in attempts:
        by_delivery.setdefault(att["delivery_id"], []).append(att)
    return [(r, by_delivery.get(r["id"], [])) for r in rows]


def enable_endpoint(db: Database, url: str) -> bool:
    """Send to a URL again after a 410 disabled it; False when it was not disabled."""
    with db.write() as conn:
        gone = conn.execute(
            delete(webhook_endpoints).where(webhook_endpoints.c.url_hash == url_hash(url))
        ).rowcount
    return bool(gone)
