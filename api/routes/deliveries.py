"""Webhook delivery logs of a job or batch, and the check of `webhook_url` on submit."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from api.auth import CallerDep
from api.deps import DbDep, ResourceId, ScopeDep
from api.docs import ERRORS
from sluice.config import Settings
from sluice.db import Database
from sluice.errors import InvalidInput
from sluice.store.batches import get_batch
from sluice.store.deliveries import DeliveryStatus, Outcome, deliveries_of
from sluice.webhooks.events import EventType
from sluice.webhooks.ssrf import check_url

router = APIRouter()

WEBHOOK_URL_DOC = (
    "Sluice extension: an http(s) URL that receives a signed event (Standard Webhooks) when "
    "this ends. Addresses must be public unless SLUICE_WEBHOOK_ALLOWLIST trusts them."
)


def key_webhook(caller: CallerDep) -> str | None:
    """The default webhook URL of the caller's key (`sluice keys create --webhook-url`)."""
    return caller.key.webhook_url if caller.key is not None else None


KeyWebhookDep = Annotated[str | None, Depends(key_webhook)]


def webhook_for(url: str | None, key_default: str | None, settings: Settings) -> str | None:
    """The URL a submit's events go to: its own webhook_url (checked), else its key's."""
    if url is not None:
        return check_webhook_url(url, settings)
    # A key's default was checked when the key was made; without a secret nothing is sent.
    return key_default if settings.webhook_keys else None


def check_webhook_url(url: str | None, settings: Settings) -> str | None:
    """The webhook URL to store, or InvalidInput naming `webhook_url`."""
    if url is None:
        return None
    if not settings.webhook_keys:
        raise InvalidInput(
            "webhooks are off on this server (no SLUICE_WEBHOOK_SECRET to sign them with)",
            param="webhook_url",
            code="webhooks_disabled",
        )
    if "\x00" in url:
        raise InvalidInput("webhook_url must not contain NUL", param="webhook_url")
    if why := check_url(url, settings.webhook_networks):
        raise InvalidInput(f"webhook_url {why}", param="webhook_url", code="invalid_value")
    return url


class AttemptOut(BaseModel):
    """One HTTP attempt."""

    attempt: int
    started_at: float
    duration_ms: int
    status_code: int | None = Field(description="The receiver's status; null if none came")
    error: str | None
    outcome: Outcome


class DeliveryOut(BaseModel):
    """One event for one URL: where it stands, and every attempt so far."""

    id: str = Field(description="The event id: the payload's id and the webhook-id header")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    type: EventType
    url: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float | None = Field(description="When the next try is due (pending)")
    last_status_code: int | None
    last_error: str | None
    created_at: float
    finished_at: float | None
    attempt_log: list[AttemptOut]


class DeliveryList(BaseModel):
    """A job's or batch's deliveries, oldest first."""

    object: Literal["list"] = "list"
    data: list[DeliveryOut]


def _log(db: Database, object_id: str, owner: str | None, kind: str) -> DeliveryList:
    # 404 for a missing or another owner's (owner None: an admin key, which sees all).
    get_batch(db, object_id, owner, kind=kind)
    out = []
    for d, attempts in deliveries_of(db, object_id):
        out.append(
            DeliveryOut(
                id=d["id"],
                type=EventType(d["event_type"]),
                url=d["url"],
                status=DeliveryStatus(d["status"]),
                attempts=d["attempts"],
                next_attempt_at=d["next_attempt_at"]
                if d["status"] == DeliveryStatus.PENDING
                else None,
                last_status_code=d["last_status_code"],
                last_error=d["last_error"],
                created_at=d["created_at"],
                finished_at=d["finished_at"],
                attempt_log=[
                    AttemptOut(
                        attempt=a["attempt"],
                        started_at=a["started_at"],
                        duration_ms=a["duration_ms"],
                        status_code=a["status_code"],
                        error=a["error"],
                        outcome=Outcome(a["outcome"]),
                    )
                    for a in attempts
                ],
            )
        )
    return DeliveryList(data=out)


@router.get("/v1/jobs/{job_id}/deliveries", responses=ERRORS)
async def job_deliveries(job_id: ResourceId, db: DbDep, owner: ScopeDep) -> DeliveryList:
    """The job's webhook deliveries and their attempts (the delivery log)."""
    return await anyio.to_thread.run_sync(_log, db, job_id, owner, "job")


@router.get("/v1/batches/{batch_id}/deliveries", responses=ERRORS)
async def batch_deliveries(batch_id: ResourceId, db: DbDep, owner: ScopeDep) -> DeliveryList:
    """The batch's webhook deliveries and their attempts (the delivery log)."""
    return await anyio.to_thread.run_sync(_log, db, batch_id, owner, "batch")
