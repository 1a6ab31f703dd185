"""Single jobs: submit one prompt, read it (optionally waiting until it ends), cancel it."""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from api.deps import CeleryDep, DbDep, OwnerDep, RedisDep, SettingsDep
from api.errors import ApiError
from api.publish import publish_cancel, publish_created
from sluice.db import Database
from sluice.errors import InvalidInput
from sluice.models import TERMINAL_REQUEST
from sluice.queue import done_channel
from sluice.render import job_object
from sluice.sampling import CHAT, COMPLETIONS, DEFAULT_MAX_TOKENS, parse_body
from sluice.store.batches import cancel_batch, create_job, get_batch
from sluice.store.files import request_page

router = APIRouter(prefix="/v1/jobs")
log = logging.getLogger("sluice.api")


class JobIn(BaseModel):
    """A job: `prompt` (completions) or `messages` (chat), and sampling parameters."""

    # Strict: "5" is not a number. Unknown fields are rejected by name, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    # Shapes of prompt, messages and stop are checked by sluice.sampling (one set of rules
    # for jobs and batch lines).
    prompt: Any = None
    messages: Any = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    stream: bool | None = None
    user: str | None = None


def _dotted(param: str | None) -> str | None:
    # sampling says messages[0].role; HTTP errors say messages.0.role, as FastAPI does.
    return re.sub(r"\[(\d+)\]", r".\1", param) if param else param


def _check(job: JobIn, accepted: list[str], default_model: str) -> tuple[str, dict[str, Any]]:
    """The endpoint and the body to store, or InvalidInput/ApiError naming the field."""
    body = job.model_dump(exclude_none=True)
    if "prompt" in body and "messages" in body:
        raise InvalidInput(
            "send either prompt (completions) or messages (chat), not both",
            param="prompt",
            code="invalid_value",
        )
    if "prompt" not in body and "messages" not in body:
        raise InvalidInput(
            "prompt or messages is required",
            param="messages",
            code="missing_required_parameter",
        )
    model = body.get("model") or default_model
    if model not in accepted:
        raise ApiError(
            404,
            f"model {model!r} is not served here (available: {', '.join(accepted)})",
            code="model_not_found",
            param="model",
        )
    body["model"] = model
    if "max_completion_tokens" not in body:
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    endpoint = CHAT if "messages" in body else COMPLETIONS
    try:
        parse_body(endpoint, body)
    except InvalidInput as exc:
        param = _dotted(exc.param)
        message = exc.message.replace(exc.param, param) if exc.param and param else exc.message
        raise InvalidInput(message, param=param, code=exc.code) from None
    return endpoint, body


def _read(db: Database, job_id: str, owner: str) -> dict[str, Any]:
    batch = get_batch(db, job_id, owner, kind="job")
    reqs = request_page(db, job_id, limit=1)
    return job_object(batch, reqs[0] if reqs else None)


async def read_job(db: Database, job_id: str, owner: str) -> dict[str, Any]:
    """The job's current view (database work off the event loop)."""
    return await anyio.to_thread.run_sync(_read, db, job_id, owner)


def _done(view: dict[str, Any]) -> bool:
    return view["status"] in TERMINAL_REQUEST


async def wait_for_job(
    db: Database, redis: Redis, job_id: str, owner: str, wait: float
) -> dict[str, Any]:
    """Read the job; if unfinished, hold until its done message or the deadline, then reread."""
    pubsub = redis.pubsub()
    try:
        try:
            # Subscribe before the first read: a finish between the two is still heard.
            await pubsub.subscribe(done_channel(job_id))
        except Exception as exc:
            log.warning("long-poll on %s without Redis (%s): answering now", job_id, exc)
            return await read_job(db, job_id, owner)
        view = await read_job(db, job_id, owner)
        if _done(view):
            return view
        deadline = anyio.current_time() + wait
        with anyio.move_on_after(wait + 1.0):
            while (left := deadline - anyio.current_time()) > 0:
                # Blocks on the socket; returns early only for messages (subscribe
                # confirmations come back as None and loop).
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is not None:
                    break
        return await read_job(db, job_id, owner)
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception as exc:
                log.debug("closing a long-poll subscription failed: %s", exc)


@router.post("", status_code=202)
async def submit_job(
    job: JobIn,
    settings: SettingsDep,
    db: DbDep,
    celery: CeleryDep,
    owner: OwnerDep,
) -> JSONResponse:
    """Queue one prompt; 202 with the job and a Location to poll."""
    endpoint, body = _check(job, settings.accepted_models, settings.served_model)
    created = await anyio.to_thread.run_sync(
        lambda: create_job(db, owner=owner, endpoint=endpoint, model=body["model"], body=body)
    )
    await publish_created(celery, settings, created)
    view = await read_job(db, created.batch_id, owner)
    return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{created.batch_id}"})


@router.get("/{job_id}")
async def get_job(
    job_id: str,
    settings: SettingsDep,
    db: DbDep,
    redis: RedisDep,
    owner: OwnerDep,
    wait: float = 0.0,
) -> dict[str, Any]:
    """The job; with ?wait=N, held up to N seconds until it ends."""
    if not 0 <= wait <= settings.max_wait_seconds:
        raise InvalidInput(
            f"wait must be between 0 and {settings.max_wait_seconds:g} seconds",
            param="wait",
            code="invalid_value",
        )
    if wait == 0:
        return await read_job(db, job_id, owner)
    return await wait_for_job(db, redis, job_id, owner, wait)


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, db: DbDep, redis: RedisDep, owner: OwnerDep) -> dict[str, Any]:
    """Cancel a queued or running job; a running one is aborted by its worker."""
    tell_workers = await anyio.to_thread.run_sync(
        lambda: cancel_batch(db, job_id, owner, kind="job")
    )
    if tell_workers:
        await publish_cancel(redis, job_id)
    return await read_job(db, job_id, owner)
