"""Request dependencies: settings, database, Celery, Redis and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Path, Query, Request
from redis.asyncio import Redis

from api.auth import Caller, get_owner, get_scope, require_admin
from api.backpressure import QueueGauge
from api.errors import ApiError
from api.listener import DoneListener
from sluice.aliases import known_models, resolve_model
from sluice.config import Settings
from sluice.db import Database

# Every id Sluice makes matches this, and the id columns hold 64 characters: anything else
# (a NUL, which PostgreSQL text cannot hold, a 10 kB string) is refused before any query.
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


@dataclass
class AppState:
    """What the lifespan opens once and every request shares."""

    settings: Settings
    db: Database
    celery: Celery
    redis: Redis
    redis_url: str
    listener: DoneListener
    gauge: QueueGauge


def get_state(request: Request) -> AppState:
    """The application's shared state."""
    state: AppState = request.app.state.sluice
    return state


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return get_state(request).settings


def get_db(request: Request) -> Database:
    """The app's database."""
    return get_state(request).db


def get_celery(request: Request) -> Celery:
    """The Celery app used for publishing only."""
    return get_state(request).celery


def get_redis(request: Request) -> Redis:
    """The asyncio Redis client (pub/sub for long-polls, PING for readiness)."""
    return get_state(request).redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StateDep = Annotated[AppState, Depends(get_state)]
# The caller's owner (what it creates belongs to it) and the owner its reads are limited
# to (None for admin keys): api/auth.py.
OwnerDep = Annotated[str, Depends(get_owner)]
ScopeDep = Annotated[str | None, Depends(get_scope)]
# Routes over every owner's data (e.g. /v1/admin/*): 403 for a key without --admin.
AdminDep = Annotated[Caller, Depends(require_admin)]

# Path and query parameters that name rows: bounded and checked where they enter.
ResourceId = Annotated[
    str, Path(pattern=ID_PATTERN, max_length=64, description="A file, batch or job id.")
]
Cursor = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, max_length=64, description="List after this id (pagination)."),
]


def served_model(settings: Settings, name: str) -> str:
    """The served model a client's name (or alias) means; 404 model_not_found listing them."""
    served = resolve_model(settings, name)
    if served is None:
        raise ApiError(
            404,
            f"model {name!r} is not served here (available: {', '.join(known_models(settings))})",
            code="model_not_found",
            param="model",
        )
    return served
