"""The outermost guard: body size limits, and every unhandled error answered, never re-raised.

Starlette's catch-all handler sends its 500 and then re-raises, so uvicorn closes the
keep-alive connection; an outage (database or Redis down) must instead answer 503 with
Retry-After on the same connection. A GET that met a connection the database dropped
(a restart) is run once more: the pool has discarded its connections by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis.exceptions
from fastapi import HTTPException
from sqlalchemy import exc as sa_exc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from sluice.config import Settings

log = logging.getLogger("sluice.api")

_DB_OUTAGES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no pooled connection came free in time
)
try:  # the COPY of an upload talks to psycopg directly, without SQLAlchemy's wrapping
    import psycopg

    _DB_OUTAGES += (psycopg.OperationalError, psycopg.InterfaceError)
except ImportError:  # pragma: no cover - psycopg is a dependency
    pass
_REDIS_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
LOG_EVERY = 5.0  # seconds between outage log lines: an outage fails every request


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def outage_of(exc: BaseException) -> str | None:
    """'database' or 'redis' when this error means a dependency is unreachable."""
    for leaf in _leaves(exc):
        if isinstance(leaf, _DB_OUTAGES):
            return "database"
        if isinstance(leaf, sa_exc.DBAPIError) and leaf.connection_invalidated:
            return "database"
        if isinstance(leaf, _REDIS_OUTAGES):
            return "redis"
    return None


def dropped_connection(exc: BaseException) -> bool:
    """The database closed a connection under us (a restart): worth one more try."""
    return any(
        isinstance(leaf, sa_exc.DBAPIError) and leaf.connection_invalidated for leaf in _leaves(exc)
    )


class TooLargeBody(HTTPException):
    """A request body over its limit (raised from receive, so FastAPI passes it through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes", {"Connection": "close"}
        )


class Guard:
    """ASGI middleware: size limits on the way in, a clean answer for every failure."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._last_log = 0.0

    def _limit(self, scope: Scope) -> int | None:
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            # Uploads are streamed and bounded by their own route (413 file_too_large).
            return None
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        if limit is None:
            await self._run(scope, receive, send, receive)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            # Refused before a byte of the body is read; the client must not reuse the socket.
            message = f"the request body is larger than {limit} bytes"
            headers = {"Connection": "close"}
            await _send(scope, receive, send, 413, message, "request_too_large", headers)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLargeBody(limit)
            return message

        await self._run(scope, receive, send, limited_receive)

    async def _run(self, scope: Scope, receive: Receive, send: Send, app_receive: Receive) -> None:
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        tries = 2 if scope["method"] in ("GET", "HEAD") else 1
        for attempt in range(1, tries + 1):
            try:
                await self.app(scope, app_receive, tracked_send)
                return
            except asyncio.CancelledError:
                # uvicorn cancels what is still open once its graceful shutdown timeout (the
                # shutdown grace) has passed: a long poll is told to retry, a stream is cut.
                if not started:
                    retry = {"Retry-After": str(self.settings.retry_after_seconds)}
                    message = "the server is shutting down; retry in a few seconds"
                    await _send(scope, receive, send, 503, message, "service_unavailable", retry)
                return
            except Exception as exc:
                if started:
                    # The status line is out: the only honest signal left is a cut stream.
                    raise
                if attempt < tries and dropped_connection(exc):
                    log.info("retrying %s %s on a fresh connection", scope["method"], scope["path"])
                    continue
                await self._answer(scope, receive, send, exc)
                return

    async def _answer(self, scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        what = outage_of(exc)
        if what is None:
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            await _send(scope, receive, send, 500, "internal server error", "internal_error")
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            log.warning("%s unavailable (%s: %s); answering 503", what, type(exc).__name__, exc)
        name = "the database" if what == "database" else "Redis"
        retry = str(self.settings.retry_after_seconds)
        # The error's text stays in the log: it may name hosts, users or paths.
        message = f"{name} is unavailable; retry in a few seconds"
        headers = {"Retry-After": retry}
        await _send(scope, receive, send, 503, message, "service_unavailable", headers)


async def _send(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    message: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> None:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    response = error_response(status, message, code=code, type_=type_, headers=headers)
    await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def install(app: Any, settings: Settings) -> None:
    """Add the guard as the outermost user middleware."""
    app.add_middleware(Guard, settings=settings)
