"""Who is calling: the API key (`Authorization: Bearer`), its owner, admin flag and rpm limit.

`authenticate` is an app-level dependency (api/app.py), so every route, including routes
added later, requires a live key; only PUBLIC_PATHS (probes, metrics) do not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.exceptions import RedisError

from api.errors import ApiError
from sluice.ids import unix
from sluice.store.keys import KeyInfo, find_key, queued_count, stored_bytes

if TYPE_CHECKING:  # api.deps imports this module for OwnerDep and ScopeDep
    from api.deps import AppState

log = logging.getLogger("sluice.api")

# Probes, the Prometheus scrape and the docs page: they must answer without a key
# (orchestrators, scrapers and browsers hold none), and they say nothing about any owner's
# files, batches or jobs.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs"})
# Owner of everything when auth is off (local use), as before keys existed.
DEFAULT_OWNER = "default"
# Response header on what an admin key reads: it may be another owner's.
ADMIN_HEADER = "Sluice-Admin"
RPM_WINDOW = 60

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `sluice keys create` (or DATA_DIR/api-key of `sluice up`).",
)


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: whose resources it creates, and which it may see."""

    owner: str
    admin: bool
    key: KeyInfo | None  # None: auth is off, or a public path

    @property
    def scope(self) -> str | None:
        """The owner reads are limited to (None: every owner, for admin keys)."""
        return None if self.admin else self.owner


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


async def _check_rpm(state: AppState, key: KeyInfo) -> None:
    """At most key.rpm_limit requests in each wall-clock minute, counted in Redis."""
    if key.rpm_limit is None:
        return
    now = unix()
    window = now // RPM_WINDOW
    counter = f"sluice:rpm:{key.id}:{window}"
    try:
        pipe = state.redis.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 2 * RPM_WINDOW)
        count, _ = await pipe.execute()
    except (RedisError, OSError) as exc:
        # A limiter outage must not become an API outage: the database still bounds the
        # queue (SLUICE_MAX_QUEUED_REQUESTS and the key's max_queued).
        log.warning("rpm limit of %s not checked: Redis is down (%s)", key.id, type(exc).__name__)
        return
    if int(count) > key.rpm_limit:
        retry = (window + 1) * RPM_WINDOW - now
        raise ApiError(
            429,
            f"this key may send {key.rpm_limit} requests per minute; retry in {retry} s",
            code="rate_limit_exceeded",
            type_="rate_limit_error",
            headers={"Retry-After": str(max(1, retry))},
        )


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller of this request, or 401 (no key, a wrong, revoked or expired key)."""
    state: AppState = request.app.state.sluice
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    if state.settings.auth == "off":
        caller = Caller(DEFAULT_OWNER, admin=True, key=None)
    elif path in PUBLIC_PATHS:
        return Caller(DEFAULT_OWNER, admin=False, key=None)
    else:
        if credentials is None or not credentials.credentials:
            raise _unauthorized(
                "an API key is required: send `Authorization: Bearer <key>` "
                "(create one with `sluice keys create`)",
                "missing_api_key",
            )
        key = await anyio.to_thread.run_sync(find_key, state.db, credentials.credentials)
        if key is None:
            # One answer for unknown, revoked and expired keys: nothing to probe.
            raise _unauthorized(
                "the API key is not valid (unknown, revoked or expired)", "invalid_api_key"
            )
        await _check_rpm(state, key)
        caller = Caller(key.owner, admin=key.admin, key=key)
    if caller.admin:
        # api.hygiene adds the response header: routes answer with several response types.
        request.scope.setdefault("state", {})["sluice_admin"] = True
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def get_owner(caller: CallerDep) -> str:
    """The owner new files, batches and jobs belong to."""
    return caller.owner


def get_scope(caller: CallerDep) -> str | None:
    """The owner reads, cancels and deletes are limited to (None: all, for admin keys)."""
    return caller.scope


def require_admin(caller: CallerDep) -> Caller:
    """403 unless the key is an admin key."""
    if not caller.admin:
        raise ApiError(
            403,
            "this route needs an admin key (`sluice keys create --admin`)",
            code="admin_required",
        )
    return caller


def _limit_error(message: str, code: str, retry_after: int) -> ApiError:
    return ApiError(
        429,
        message,
        code=code,
        type_="rate_limit_error",
        headers={"Retry-After": str(retry_after)},
    )


async def check_queued(state: AppState, caller: Caller, adding: int) -> None:
    """429 when the owner's unfinished requests plus `adding` pass the key's max_queued."""
    limit = caller.key.queued_limit if caller.key else None
    if limit is None:
        return
    queued = await anyio.to_thread.run_sync(queued_count, state.db, caller.owner)
    if queued + adding > limit:
        raise _limit_error(
            f"this key may have {limit} requests queued or running; {queued} are, and this "
            f"adds {adding}",
            "queued_limit_exceeded",
            state.settings.retry_after_seconds,
        )


async def check_stored(state: AppState, caller: Caller, adding: int) -> None:
    """429 when the owner's stored upload bytes plus `adding` pass the key's max_bytes."""
    limit = caller.key.bytes_limit if caller.key else None
    if limit is None:
        return
    stored = await anyio.to_thread.run_sync(stored_bytes, state.db, caller.owner)
    if stored + adding > limit or stored >= limit:
        raise _limit_error(
            f"this key may store {limit} bytes of files; {stored} are stored and this upload "
            f"declares {adding}: delete files (or wait for them to expire)",
            "storage_limit_exceeded",
            state.settings.retry_after_seconds,
        )


def document_public_paths(app: FastAPI) -> None:
    """The OpenAPI schema says PUBLIC_PATHS need no key (the app-level scheme says all do)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, item in schema.get("paths", {}).items():
            if path not in PUBLIC_PATHS:
                continue
            for operation in item.values():
                operation["security"] = []
                operation.get("responses", {}).pop("401", None)
                operation.get("responses", {}).pop("429", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
