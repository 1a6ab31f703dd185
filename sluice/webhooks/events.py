"""Event payloads, in OpenAI's webhook shape: {id, object: "event", type, created_at, data}."""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Any

from sluice.models import B_CANCELLED, B_EXPIRED, B_FAILED, COMPLETED, SUCCEEDED


class EventType(StrEnum):
    """Every event Sluice sends."""

    JOB_COMPLETED = "job.completed"
    JOB_FAILED = "job.failed"
    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_EXPIRED = "batch.expired"
    BATCH_CANCELLED = "batch.cancelled"


BATCH_EVENTS = {
    COMPLETED: EventType.BATCH_COMPLETED,
    B_FAILED: EventType.BATCH_FAILED,
    B_EXPIRED: EventType.BATCH_EXPIRED,
    B_CANCELLED: EventType.BATCH_CANCELLED,
}


def new_event_id() -> str:
    """An event id: the payload's id and the webhook-id header of every attempt."""
    return f"evt_{uuid.uuid4().hex}"


def batch_event_type(status: str) -> EventType:
    """The event of a batch that ended with this status."""
    return BATCH_EVENTS[status]


def job_event_type(request_status: str) -> EventType:
    """job.completed when the prompt succeeded; job.failed for any other end (failed,
    cancelled, expired: the job object in the event says which)."""
    return EventType.JOB_COMPLETED if request_status == SUCCEEDED else EventType.JOB_FAILED


def payload(
    event_id: str, event_type: EventType, created_at: int, object_id: str, job: Any = None
) -> str:
    """The JSON body; a job event carries the job object (its output, usage and error)."""
    data: dict[str, Any] = {"id": object_id}
    if job is not None:
        data["job"] = job
    body = {
        "id": event_id,
        "object": "event",
        "type": str(event_type),
        "created_at": created_at,
        "data": data,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
