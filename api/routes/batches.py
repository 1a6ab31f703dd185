"""Batches (OpenAI's Batch API): create, get, list, cancel; and results while running."""

from __future__ import annotations

from typing import Any, Literal

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import CallerDep, check_queued
from api.deps import (
    ID_PATTERN,
    CeleryDep,
    Cursor,
    DbDep,
    OwnerDep,
    RedisDep,
    ResourceId,
    ScopeDep,
    StateDep,
)
from api.docs import COMMON, ERRORS, SUBMIT_ERRORS
from api.errors import ApiError
from api.publish import publish_cancel, publish_created
from api.routes.deliveries import WEBHOOK_URL_DOC, KeyWebhookDep, webhook_for
from api.streams import primed
from sluice.aliases import aliases
from sluice.db import Database
from sluice.errors import InvalidInput, NotFound
from sluice.render import batch_object, results_chunks
from sluice.sampling import check_endpoint
from sluice.store.batches import (
    cancel_batch,
    create_batch,
    get_batch,
    list_batches,
    window_seconds,
)
from sluice.store.files import complete_through_line, get_file

router = APIRouter(prefix="/v1/batches")

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class OutputExpiresAfter(BaseModel):
    """OpenAI's output_expires_after: the output and error files live this long."""

    anchor: Literal["created_at"] = "created_at"
    # OpenAI's bounds: one hour to 30 days.
    seconds: int = Field(ge=3600, le=30 * 86400)


class BatchIn(BaseModel):
    """OpenAI's batch creation body (fields it may add later are ignored)."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(max_length=64, pattern=ID_PATTERN)
    endpoint: str = Field(max_length=64)
    output_expires_after: OutputExpiresAfter | None = None
    completion_window: str = Field("24h", max_length=16)
    metadata: dict[str, str] | None = None
    # Sluice extension (OpenAI has no such field): where batch.* events go.
    webhook_url: str | None = Field(None, max_length=2048, description=WEBHOOK_URL_DOC)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidInput(
            f"metadata holds at most {MAX_METADATA_PAIRS} pairs, not {len(metadata)}",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if "\x00" in key or "\x00" in value:
            raise InvalidInput(
                "metadata keys and values must not contain NUL (\\u0000)",
                param="metadata",
                code="invalid_value",
            )
        if len(key) > MAX_METADATA_KEY:
            raise InvalidInput(
                f"metadata keys are at most {MAX_METADATA_KEY} characters ({key[:20]!r}... has "
                f"{len(key)})",
                param="metadata",
                code="invalid_value",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidInput(
                f"metadata values are at most {MAX_METADATA_VALUE} characters (the value of "
                f"{key!r} has {len(value)})",
                param="metadata",
                code="invalid_value",
            )


async def _line_count(db: Database, file_id: str, owner: str) -> int:
    """The requests a file would queue (0 when it is not the owner's: create answers 404)."""
    try:
        row = await anyio.to_thread.run_sync(get_file, db, file_id, owner)
    except NotFound:
        return 0
    return int(row["line_count"])


def _object(db: Database, batch_id: str, owner: str | None) -> dict[str, Any]:
    return batch_object(get_batch(db, batch_id, owner))


@router.post("", responses=SUBMIT_ERRORS)
async def create(
    batch: BatchIn,
    state: StateDep,
    db: DbDep,
    celery: CeleryDep,
    owner: OwnerDep,
    key_webhook: KeyWebhookDep,
    caller: CallerDep,
) -> dict[str, Any]:
    """Check the input file and queue its lines; a file with bad lines gives a failed batch."""
    settings = state.settings
    check_endpoint(batch.endpoint, settings.task, "endpoint", code="invalid_value")
    window_seconds(batch.completion_window, settings.max_completion_window)
    _check_metadata(batch.metadata)
    webhook_url = webhook_for(batch.webhook_url, key_webhook, settings)
    await state.gauge.admit()
    if caller.key is not None and caller.key.queued_limit is not None:
        await check_queued(state, caller, await _line_count(db, batch.input_file_id, owner))
    expiry = batch.output_expires_after

    def run() -> Any:
        return create_batch(
            db,
            owner=owner,
            input_file_id=batch.input_file_id,
            endpoint=batch.endpoint,
            completion_window=batch.completion_window,
            metadata=batch.metadata,
            webhook_url=webhook_url,
            accepted_models=settings.accepted_models,
            aliases=aliases(settings),
            max_requests=settings.max_file_lines,
            max_window=settings.max_completion_window,
            prefix_order=settings.prefix_order,
            output_expires_after=expiry.seconds if expiry else None,
        )

    try:
        created = await anyio.to_thread.run_sync(run)
    except NotFound as exc:
        raise ApiError(404, str(exc), code="file_not_found", param="input_file_id") from None
    state.gauge.added(len(created.request_ids))
    await publish_created(celery, settings, created)
    return await anyio.to_thread.run_sync(_object, db, created.batch_id, owner)


@router.get("", responses=COMMON)
async def list_all(
    db: DbDep,
    owner: ScopeDep,
    after: Cursor = None,
    limit: int = Query(20, ge=1, le=100),
) -> dict[str, Any]:
    """The caller's batches, newest first (OpenAI cursor pagination)."""
    rows = await anyio.to_thread.run_sync(list_batches, db, owner, after, limit)
    data = [batch_object(r) for r in rows[:limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(rows) > limit,
    }


@router.get("/{batch_id}", responses=ERRORS)
async def retrieve(batch_id: ResourceId, db: DbDep, owner: ScopeDep) -> dict[str, Any]:
    """One batch."""
    return await anyio.to_thread.run_sync(_object, db, batch_id, owner)


@router.post("/{batch_id}/cancel", responses=ERRORS)
async def cancel(
    batch_id: ResourceId, db: DbDep, redis: RedisDep, owner: ScopeDep
) -> dict[str, Any]:
    """Cancel: queued requests never run; workers abort running ones (status cancelling)."""
    tell_workers = await anyio.to_thread.run_sync(cancel_batch, db, batch_id, owner)
    if tell_workers:
        await publish_cancel(redis, batch_id)
    return await anyio.to_thread.run_sync(_object, db, batch_id, owner)


# Response header of /results: the resume point that misses nothing.
COMPLETE_THROUGH = "Sluice-Complete-Through-Line"


@router.get("/{batch_id}/results", responses=ERRORS)
async def results(
    batch_id: ResourceId,
    db: DbDep,
    owner: ScopeDep,
    after_line: int | None = Query(None, ge=0, le=2**31 - 1),
) -> StreamingResponse:
    """Lines finished so far (any end status) in output-file format, by line number.

    Lines finish out of order, so resume with `after_line` set to the last
    `Sluice-Complete-Through-Line` header seen (every line up to it had ended), and skip the
    custom_ids already received: nothing is then missed.
    """
    await anyio.to_thread.run_sync(get_batch, db, batch_id, owner)
    # Read before the lines: every line up to it is then in the stream that follows.
    through = await anyio.to_thread.run_sync(complete_through_line, db, batch_id)
    chunks = await primed(results_chunks(db, batch_id, after_line))
    return StreamingResponse(
        chunks, media_type="application/jsonl", headers={COMPLETE_THROUGH: str(through)}
    )
