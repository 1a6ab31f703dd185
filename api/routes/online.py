"""Online OpenAI endpoints: /v1/chat/completions and /v1/completions (plain or streamed), and
/v1/embeddings (SLUICE_TASK=embed).

Each request is a job row (interactive priority: admitted before bulk work, same lease and
exactly-once rules), so an accepted request survives a worker crash; the answer waits for the
row. A streamed answer relays the worker's pieces from a Redis Stream (sluice/deltas.py) as
they come and closes with what the committed row holds. A client that goes away cancels its
request, which frees its engine slot. Past SLUICE_ONLINE_TIMEOUT the answer is 504 (or an
error event in a stream) and the request is cancelled; queue and waiter limits answer 429.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy.engine import RowMapping

from api.auth import CallerDep, check_queued
from api.deps import OwnerDep, StateDep, served_model
from api.docs import SUBMIT_ERRORS
from api.errors import ApiError
from api.publish import publish_cancel, publish_created
from api.sse import DONE, Chunks, error_event
from sluice.config import Settings
from sluice.deltas import stream_key
from sluice.errors import Conflict, InvalidInput, NotFound
from sluice.models import CANCELLED, EXPIRED, SUCCEEDED, TERMINAL_REQUEST
from sluice.render import SERVER_ERROR_CODES, completion_body
from sluice.sampling import (
    CHAT,
    COMPLETIONS,
    DEFAULT_MAX_TOKENS,
    EMBEDDINGS,
    check_endpoint,
    parse_body,
)
from sluice.store.batches import cancel_batch, create_job
from sluice.store.files import request_page

router = APIRouter(prefix="/v1")
log = logging.getLogger("sluice.api")

# How long one XREAD blocks, and so how often a quiet stream looks at the database (a piece
# or the end marker wakes it at once).
POLL_SECONDS = 1.0
READ_COUNT = 512

OnlineBody = Annotated[dict[str, Any], Body(description="An OpenAI request body.")]


def check_online(endpoint: str, body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The body to store (model resolved to its served name), or a 400/404 naming the field."""
    body = dict(body)
    check_endpoint(endpoint, settings.task, "endpoint")
    model = body.get("model", settings.served_model)
    if not isinstance(model, str) or not model:
        raise InvalidInput("model must be a model name", param="model", code="invalid_value")
    body["model"] = served_model(settings, model)
    if endpoint != EMBEDDINGS and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    parse_body(
        endpoint,
        body,
        max_tokens_limit=settings.output_tokens_limit,
        check_nul=True,
        engine=settings.engine,
        allow_stream=True,
    )
    stream = body.get("stream") is True
    if body.get("stream_options") is not None and not stream:
        raise InvalidInput(
            "stream_options is only allowed with stream: true",
            param="stream_options",
            code="invalid_value",
        )
    if stream and body.get("n", 1) not in (1, None):
        raise InvalidInput("n must be 1 when streaming", param="n", code="invalid_value")
    if not stream:
        body.pop("stream", None)
    return body


def _row(state_db: Any, job_id: str) -> RowMapping | None:
    rows = request_page(state_db, job_id, limit=1)
    return rows[0] if rows else None


async def read_row(state: Any, job_id: str) -> RowMapping | None:
    """The online request's row (database work off the event loop)."""
    return await anyio.to_thread.run_sync(_row, state.db, job_id)


async def cancel(state: Any, job_id: str, owner: str) -> None:
    """Cancel an abandoned request: queued, it never runs; running, its worker aborts it."""
    with anyio.CancelScope(shield=True):
        try:
            tell = await anyio.to_thread.run_sync(
                lambda: cancel_batch(state.db, job_id, owner, kind="job")
            )
        except (Conflict, NotFound):
            return  # it ended meanwhile
        except Exception:
            log.warning("could not cancel abandoned request %s", job_id, exc_info=True)
            return
        if tell:
            await publish_cancel(state.redis, job_id)


def _failure(row: RowMapping, settings: Settings) -> ApiError:
    """The HTTP error of a request that ended without an answer."""
    status, code = row["status"], row["error_code"] or "request_failed"
    message = row["error_message"] or "the request failed"
    if status == CANCELLED:
        return ApiError(409, message, code=code)
    if status == EXPIRED:
        return ApiError(
            504, message, code=code, type_="server_error",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )  # fmt: skip
    if code in SERVER_ERROR_CODES:
        return ApiError(500, message, code=code, type_="server_error")
    return ApiError(400, message, code=code)


def _timeout(settings: Settings) -> ApiError:
    return ApiError(
        504,
        f"the request did not finish within {settings.online_timeout:g} seconds and was "
        "cancelled; retry later or raise SLUICE_ONLINE_TIMEOUT",
        code="timeout",
        type_="server_error",
        headers={"Retry-After": str(settings.retry_after_seconds)},
    )


async def _submit(
    endpoint: str, body: dict[str, Any], state: Any, owner: str
) -> tuple[str, int, dict[str, Any]]:
    settings: Settings = state.settings
    stored = check_online(endpoint, body, settings)
    if state.listener.count >= settings.max_long_polls:
        raise ApiError(
            429,
            f"{settings.max_long_polls} requests are waiting for answers already; retry later",
            code="too_many_waiting",
            type_="server_error",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    await state.gauge.admit()
    created = await anyio.to_thread.run_sync(
        lambda: create_job(
            state.db, owner=owner, endpoint=endpoint, model=stored["model"], body=stored
        )
    )
    state.gauge.added(len(created.request_ids))
    await publish_created(state.celery, settings, created)
    return created.batch_id, created.request_ids[0], stored


async def _answer(state: Any, request: Request, job_id: str, owner: str) -> Response:
    """Wait for the row (its done notice, or the database each second) and answer."""
    settings: Settings = state.settings
    listener = state.listener
    ended = False
    try:
        with listener.waiting(job_id) as waiter:
            row = await read_row(state, job_id)
            deadline = anyio.current_time() + settings.online_timeout
            while row is None or row["status"] not in TERMINAL_REQUEST:
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise _timeout(settings)
                with anyio.move_on_after(min(left, POLL_SECONDS)):
                    await waiter.event.wait()
                waiter.rearm()
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; cancelled below
                row = await read_row(state, job_id)
        ended = True
        if row["status"] == SUCCEEDED:
            return JSONResponse(completion_body(row))
        raise _failure(row, settings)
    finally:
        if not ended:
            await cancel(state, job_id, owner)


class _Relay:
    """One stream's state: what was sent, which attempt is followed, whether pieces were lost."""

    def __init__(self) -> None:
        self.sent = ""
        self.attempt: int | None = None
        self.gap = False

    def take(self, fields: dict[bytes, bytes]) -> str | None:
        """The new text in one piece ("" if none); None if it contradicts what was sent."""
        attempt = int(fields[b"a"])
        if self.attempt is None or attempt > self.attempt:
            # A retried request streams again from offset 0: what matches what was sent is
            # skipped, anything else ends the stream with an error (never garbled text).
            self.attempt, self.gap = attempt, False
        elif attempt < self.attempt:
            return ""
        if b"e" in fields or self.gap:
            return ""
        offset, text = int(fields[b"o"]), fields[b"t"].decode("utf-8", "replace")
        if offset > len(self.sent):
            self.gap = True  # trimmed or dropped pieces: the rest comes from the row
            return ""
        overlap = self.sent[offset : offset + len(text)]
        if text[: len(overlap)] != overlap:
            return None
        return text[len(overlap) :]


async def _relay(
    state: Any, job_id: str, request_id: int, owner: str, chunks: Chunks
) -> AsyncIterator[bytes]:
    """The SSE body: pieces as they come, then the rest from the row, usage, [DONE]."""
    settings: Settings = state.settings
    key = stream_key(job_id, request_id)
    relay = _Relay()
    last = b"0-0"
    ended = False
    try:
        # Counted as waiting from the start (SLUICE_MAX_LONG_POLLS bounds streams too).
        with state.listener.waiting(job_id) as waiter:
            first = chunks.first()
            if first is not None:
                yield first
            deadline = anyio.current_time() + settings.online_timeout
            while True:
                left = deadline - anyio.current_time()
                if left <= 0:
                    yield error_event(_timeout(settings).message, "timeout")
                    yield DONE
                    return  # not ended: cancelled below
                marker = False
                try:
                    block = max(1, int(min(left, POLL_SECONDS) * 1000))
                    got = await state.redis.xread({key: last}, count=READ_COUNT, block=block)
                except RedisError:
                    # Pieces are an optimisation: without Redis the answer comes from the row.
                    got = []
                    await anyio.sleep(POLL_SECONDS)
                for _, entries in got or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        marker = marker or b"e" in fields
                        piece = relay.take(fields)
                        if piece is None:
                            ended = True  # the row completes on its own; nothing to cancel
                            yield error_event(
                                "the worker running this request failed and its retry "
                                "produced different text; retry the request",
                                "stream_interrupted",
                            )
                            yield DONE
                            return
                        if piece:
                            relay.sent += piece
                            yield chunks.text(piece)
                if not (marker or waiter.rearm() or not got):
                    continue
                row = await read_row(state, job_id)
                if row is None or row["status"] not in TERMINAL_REQUEST:
                    continue
                ended = True
                async for tail in _close(row, relay, chunks, settings):
                    yield tail
                return
    finally:
        if not ended:
            await cancel(state, job_id, owner)


async def _close(
    row: RowMapping, relay: _Relay, chunks: Chunks, settings: Settings
) -> AsyncIterator[bytes]:
    """The end of a stream from the committed row: missed text, finish, usage, [DONE]."""
    if row["status"] != SUCCEEDED:
        err = _failure(row, settings)
        yield error_event(err.message, err.code or "request_failed", err.type)
        yield DONE
        return
    final = row["output_text"] or ""
    if not final.startswith(relay.sent):
        yield error_event("the streamed text does not match the stored answer", "stream_mismatch")
        yield DONE
        return
    if len(final) > len(relay.sent):
        yield chunks.text(final[len(relay.sent) :])
    yield chunks.finish(row["finish_reason"] or "stop")
    if chunks.include_usage:
        yield chunks.usage(
            int(row["prompt_tokens"] or 0),
            int(row["completion_tokens"] or 0),
            int(row["cached_tokens"] or 0),
        )
    yield DONE


async def _serve(
    endpoint: str, body: dict[str, Any], request: Request, state: Any, owner: str
) -> Response:
    job_id, request_id, stored = await _submit(endpoint, body, state, owner)
    # The job behind the answer: GET /v1/jobs/{id} shows it (status, timings) too.
    headers = {"Sluice-Job-Id": job_id}
    if not stored.get("stream"):
        try:
            response = await _answer(state, request, job_id, owner)
        except ApiError as exc:
            exc.headers = {**(exc.headers or {}), **headers}
            raise
        response.headers.update(headers)
        return response
    options = stored.get("stream_options") or {}
    chunks = Chunks(endpoint, request_id, stored["model"], options.get("include_usage") is True)
    return StreamingResponse(
        _relay(state, job_id, request_id, owner, chunks),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
    )


@router.post("/chat/completions", responses=SUBMIT_ERRORS, response_model=None)
async def chat_completions(
    body: OnlineBody, request: Request, state: StateDep, owner: OwnerDep, caller: CallerDep
) -> Response:
    """OpenAI chat completion: the chat.completion object, or its chunks as SSE (stream)."""
    await check_queued(state, caller, 1)  # the key's max_queued (api/auth.py)
    return await _serve(CHAT, body, request, state, owner)


@router.post("/completions", responses=SUBMIT_ERRORS, response_model=None)
async def completions(
    body: OnlineBody, request: Request, state: StateDep, owner: OwnerDep, caller: CallerDep
) -> Response:
    """OpenAI text completion: the text_completion object, or its chunks as SSE (stream)."""
    await check_queued(state, caller, 1)  # the key's max_queued (api/auth.py)
    return await _serve(COMPLETIONS, body, request, state, owner)


@router.post("/embeddings", responses=SUBMIT_ERRORS, response_model=None)
async def embeddings(
    body: OnlineBody, request: Request, state: StateDep, owner: OwnerDep, caller: CallerDep
) -> Response:
    """OpenAI embeddings (SLUICE_TASK=embed): the list of embedding objects, in input order."""
    await check_queued(state, caller, 1)  # the key's max_queued (api/auth.py)
    return await _serve(EMBEDDINGS, body, request, state, owner)
