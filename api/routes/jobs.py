"""Single jobs: submit one prompt, read it (optionally waiting until it ends), cancel it."""

from __future__ import annotations

import logging
import re
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import CallerDep, check_queued
from api.deps import (
    CeleryDep,
    DbDep,
    OwnerDep,
    RedisDep,
    ResourceId,
    ScopeDep,
    StateDep,
    served_model,
)
from api.docs import ERRORS, SUBMIT_ERRORS
from api.errors import ApiError
from api.listener import DoneListener
from api.publish import publish_cancel, publish_created
from api.routes.deliveries import WEBHOOK_URL_DOC, KeyWebhookDep, webhook_for
from sluice.config import Settings
from sluice.db import Database
from sluice.errors import InvalidInput
from sluice.models import TERMINAL_REQUEST
from sluice.render import job_object
from sluice.sampling import (
    CHAT,
    COMPLETIONS,
    DEFAULT_MAX_TOKENS,
    EMBEDDINGS,
    MAX_MODEL_NAME,
    check_endpoint,
    parse_body,
)
from sluice.store.batches import cancel_batch, create_job, get_batch
from sluice.store.files import request_page

router = APIRouter(prefix="/v1/jobs")
log = logging.getLogger("sluice.api")
NO_REDIS_POLL = 1.0


class JobIn(BaseModel):
    """A job: `prompt` (completions), `messages` (chat) or `input` (embeddings), and the
    parameters of that endpoint."""

    # Strict: "5" is not a number. Unknown fields are rejected by name, as OpenAI does.
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    # Shapes of prompt, messages and stop are checked by sluice.sampling (one set of rules
    # for jobs and batch lines).
    prompt: Any = None
    messages: Any = None
    input: Any = None  # /v1/embeddings (SLUICE_TASK=embed)
    encoding_format: str | None = None
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
    metadata: dict[str, str] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # Chat: true/false (with top_logprobs); completions: 0-5 alternatives.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # Refused by the checker with a message naming them (no tool-call parser here).
    tools: Any = None
    tool_choice: Any = None
    # Sluice: where to send job.completed / job.failed (api/routes/deliveries.py).
    webhook_url: str | None = Field(None, max_length=2048, description=WEBHOOK_URL_DOC)


def _dotted(param: str | None) -> str | None:
    # sampling says messages[0].role; HTTP errors say messages.0.role, as FastAPI does.
    return re.sub(r"\[(\d+)\]", r".\1", param) if param else param


def _check(job: JobIn, settings: Settings) -> tuple[str, dict[str, Any]]:
    """The endpoint and the body to store, or InvalidInput/ApiError naming the field."""
    return check_body(job.model_dump(exclude_none=True, exclude={"webhook_url"}), settings)


def check_body(body: dict[str, Any], settings: Settings) -> tuple[str, dict[str, Any]]:
    """A job's or online request's body checked: its endpoint and the body to store (the
    model resolved to its served name), or InvalidInput/ApiError naming the field."""
    default_model = settings.served_model
    given = [name for name in ("prompt", "messages", "input") if name in body]
    if len(given) > 1:
        raise InvalidInput(
            f"send one of prompt (completions), messages (chat) or input (embeddings), "
            f"not {' and '.join(given)}",
            param=given[0],
            code="invalid_value",
        )
    if not given:
        raise InvalidInput(
            "prompt, messages or input is required",
            param="messages",
            code="missing_required_parameter",
        )
    model = body.get("model") or default_model
    if len(model) > MAX_MODEL_NAME or "\x00" in model:
        raise InvalidInput(
            f"model must be at most {MAX_MODEL_NAME} characters, without NUL",
            param="model",
            code="invalid_value",
        )
    body["model"] = served_model(settings, model)
    endpoint = {"prompt": COMPLETIONS, "messages": CHAT, "input": EMBEDDINGS}[given[0]]
    check_endpoint(endpoint, settings.task, given[0], code="invalid_value")
    if endpoint != EMBEDDINGS and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    try:
        parse_body(
            endpoint,
            body,
            max_tokens_limit=settings.output_tokens_limit,
            check_nul=True,
            engine=settings.engine,
        )
    except InvalidInput as exc:
        param = _dotted(exc.param)
        message = exc.message.replace(exc.param, param) if exc.param and param else exc.message
        raise InvalidInput(message, param=param, code=exc.code) from None
    return endpoint, body


def _read(db: Database, job_id: str, owner: str | None) -> dict[str, Any]:
    batch = get_batch(db, job_id, owner, kind="job")
    reqs = request_page(db, job_id, limit=1)
    return job_object(batch, reqs[0] if reqs else None)


async def read_job(db: Database, job_id: str, owner: str | None) -> dict[str, Any]:
    """The job's current view (database work off the event loop)."""
    return await anyio.to_thread.run_sync(_read, db, job_id, owner)


def _done(view: dict[str, Any]) -> bool:
    return view["status"] in TERMINAL_REQUEST


async def wait_for_job(
    db: Database, listener: DoneListener, job_id: str, owner: str | None, wait: float
) -> dict[str, Any]:
    """Read the job; if unfinished, hold until its done notice or the deadline, then reread."""
    # Registered before the first read: a finish between the two still wakes us.
    with listener.waiting(job_id) as waiter:
        view = await read_job(db, job_id, owner)
        deadline = anyio.current_time() + wait
        while not _done(view) and (left := deadline - anyio.current_time()) > 0:
            # Without Redis no notice comes: look at the database every second instead.
            step = left if listener.healthy else min(left, NO_REDIS_POLL)
            with anyio.move_on_after(step):
                await waiter.event.wait()
            waiter.rearm()  # before the reread: a notice during it wakes the next round
            view = await read_job(db, job_id, owner)
        return view


@router.post("", status_code=202, responses=SUBMIT_ERRORS)
async def submit_job(
    job: JobIn,
    state: StateDep,
    db: DbDep,
    celery: CeleryDep,
    owner: OwnerDep,
    key_webhook: KeyWebhookDep,
    caller: CallerDep,
) -> JSONResponse:
    """Queue one prompt; 202 with the job and a Location to poll."""
    settings = state.settings
    endpoint, body = _check(job, settings)
    webhook_url = webhook_for(job.webhook_url, key_webhook, settings)
    await state.gauge.admit()
    await check_queued(state, caller, 1)
    created = await anyio.to_thread.run_sync(
        lambda: create_job(
            db,
            owner=owner,
            endpoint=endpoint,
            model=body["model"],
            body=body,
            webhook_url=webhook_url,
        )
    )
    state.gauge.added(len(created.request_ids))
    await publish_created(celery, settings, created)
    view = await read_job(db, created.batch_id, owner)
    return JSONResponse(view, status_code=202, headers={"Location": f"/v1/jobs/{created.batch_id}"})


@router.get("/{job_id}", responses=SUBMIT_ERRORS)
async def get_job(
    job_id: ResourceId,
    state: StateDep,
    db: DbDep,
    owner: ScopeDep,
    wait: float = 0.0,
) -> dict[str, Any]:
    """The job; with ?wait=N, held up to N seconds until it ends."""
    settings = state.settings
    if not 0 <= wait <= settings.max_wait_seconds:
        raise InvalidInput(
            f"wait must be between 0 and {settings.max_wait_seconds:g} seconds",
            param="wait",
            code="invalid_value",
        )
    if wait == 0:
        return await read_job(db, job_id, owner)
    if state.listener.count >= settings.max_long_polls:
        raise ApiError(
            429,
            f"{settings.max_long_polls} long-polls are waiting already; poll without wait, "
            "or retry later",
            code="too_many_long_polls",
            param="wait",
            type_="server_error",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    return await wait_for_job(db, state.listener, job_id, owner, wait)


@router.post("/{job_id}/cancel", responses=ERRORS)
async def cancel_job(
    job_id: ResourceId, db: DbDep, redis: RedisDep, owner: ScopeDep
) -> dict[str, Any]:
    """Cancel a queued or running job; a running one is aborted by its worker."""
    tell_workers = await anyio.to_thread.run_sync(
        lambda: cancel_batch(db, job_id, owner, kind="job")
    )
    if tell_workers:
        await publish_cancel(redis, job_id)
    return await read_job(db, job_id, owner)
