"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import DbDep, RedisDep, SettingsDep
from api.errors import ApiError
from sluice.db import Database

router = APIRouter()
CHECK_TIMEOUT = 3.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (says nothing about its dependencies)."""
    return {"status": "ok"}


def _select_one(db: Database) -> None:
    with db.read() as conn:
        conn.execute(text("SELECT 1")).scalar()


@router.get("/readyz", response_model=None)
async def readyz(db: DbDep, redis: RedisDep) -> JSONResponse:
    """200 when the database and Redis answer; 503 naming what does not."""
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await anyio.to_thread.run_sync(_select_one, db, abandon_on_cancel=True)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}: {exc}"[:300]
    try:
        with anyio.fail_after(CHECK_TIMEOUT):
            await redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}: {exc}"[:300]
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        message = "; ".join(f"{name} is {checks[name]}" for name in down)
        body: dict[str, Any] = {
            "status": "unavailable",
            "down": down,
            "checks": checks,
            "error": {
                "message": message,
                "type": "server_error",
                "param": None,
                "code": "service_unavailable",
                "line": None,
            },
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}


@router.get("/v1/models")
async def list_models(settings: SettingsDep) -> dict[str, Any]:
    """The models this deployment accepts, as OpenAI's model list."""
    return {"object": "list", "data": [_model(m) for m in settings.accepted_models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, settings: SettingsDep) -> dict[str, Any]:
    """One accepted model."""
    if model_id not in settings.accepted_models:
        raise ApiError(
            404, f"model {model_id!r} is not served here", code="model_not_found", param="model"
        )
    return _model(model_id)
