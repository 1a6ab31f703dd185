"""Liveness, readiness and the model list."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import AppState, DbDep, RedisDep, SettingsDep, StateDep, served_model
from api.docs import COMMON, ERRORS
from api.workers import models_without_worker, read_workers
from sluice.aliases import aliases
from sluice.config import Settings
from sluice.db import Database

router = APIRouter()
log = logging.getLogger("sluice.api")
# Model names are not ids: any printable text, as long as the column holds.
MODEL_ID = Path(max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
CHECK_TIMEOUT = 3.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (says nothing about its dependencies)."""
    return {"status": "ok"}


def _select_one(db: Database) -> None:
    with db.read() as conn:
        conn.execute(text("SELECT 1")).scalar()


def _listener(state: AppState) -> str:
    # The one pub/sub connection that wakes long-polls (api/listener.py).
    return "subscribed" if state.listener.healthy else "reconnecting"


UNKNOWN = "unknown (redis is down)"


async def _workers_check(state: AppState) -> str:
    """ok when every accepted model has a live worker; else which have none."""
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            workers = await read_workers(state.redis, state.settings.worker_stale_seconds)
    except Exception as exc:
        # Workers are known only through Redis: its outage is reported once, as redis.
        log.warning("readiness: cannot read workers (%s: %s)", type(exc).__name__, exc)
        return UNKNOWN
    missing = models_without_worker(workers, state.settings.accepted_models)
    if not missing:
        return "ok"
    names = ", ".join(repr(m) for m in missing)
    return f"no live worker serves {names} (start one: sluice worker)"


@router.get("/readyz", response_model=None, responses={503: COMMON[503]})
async def readyz(db: DbDep, redis: RedisDep, state: StateDep) -> JSONResponse:
    """200 when the database and Redis answer and every accepted model has a live worker;
    503 naming what does not."""
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await anyio.to_thread.run_sync(_select_one, db, abandon_on_cancel=True)
        checks["database"] = "ok"
    except Exception as exc:
        # The error's text stays in the log: it may name hosts, users or paths.
        log.warning("readiness: the database is down (%s: %s)", type(exc).__name__, exc)
        checks["database"] = f"down ({type(exc).__name__})"
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("readiness: Redis is down (%s: %s)", type(exc).__name__, exc)
        checks["redis"] = f"down ({type(exc).__name__})"
    if state.settings.ready_requires_worker:
        redis_ok = checks["redis"] == "ok"
        checks["workers"] = await _workers_check(state) if redis_ok else UNKNOWN
    down = sorted(name for name, state in checks.items() if state not in ("ok", UNKNOWN))
    if down:
        message = "; ".join(
            checks[name] if name == "workers" else f"{name} is {checks[name]}" for name in down
        )
        body: dict[str, Any] = {
            "status": "unavailable",
            "down": down,
            "checks": checks,
            "long_polls": state.listener.count,
            "listener": _listener(state),
            "error": {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
                "line": None,
            },
        }
        return JSONResponse(
            body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_seconds)}
        )
    # long_polls: clients held in ?wait= right now (SLUICE_MAX_LONG_POLLS bounds them).
    return JSONResponse(
        {
            "status": "ready",
            "checks": checks,
            "long_polls": state.listener.count,
            "listener": _listener(state),
        }
    )


def _model(name: str, root: str) -> dict[str, Any]:
    # root: the served model an alias stands for (vLLM's model cards carry it too).
    return {"id": name, "object": "model", "created": 0, "owned_by": "sluice", "root": root}


def _models(settings: Settings) -> list[dict[str, Any]]:
    served = [_model(m, m) for m in settings.accepted_models]
    return served + [_model(alias, target) for alias, target in aliases(settings).items()]


@router.get("/v1/models")
async def list_models(settings: SettingsDep) -> dict[str, Any]:
    """The models this deployment serves and their aliases, as OpenAI's model list."""
    return {"object": "list", "data": _models(settings)}


@router.get("/v1/models/{model_id:path}", responses=ERRORS)
async def get_model(model_id: Annotated[str, MODEL_ID], settings: SettingsDep) -> dict[str, Any]:
    """One served model or alias."""
    served_model(settings, model_id)  # 404 naming the served names when it is neither
    return next(m for m in _models(settings) if m["id"] == model_id)
