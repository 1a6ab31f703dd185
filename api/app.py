"""The FastAPI application: lifespan (database, Redis, Celery), error handlers, routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import Depends, FastAPI

from api import metrics
from api.auth import authenticate, document_public_paths
from api.backpressure import QueueGauge
from api.deps import AppState
from api.docs import AUTH_ERRORS
from api.errors import install as install_errors
from api.guard import install as install_guard
from api.hygiene import install as install_hygiene
from api.listener import DoneListener
from api.query import refuse_unknown_query
from api.routes import batches, deliveries, files, health, jobs, online, status
from sluice.config import Settings, get_settings
from sluice.db import get_database
from sluice.queue import make_celery
from sluice.redis_clients import async_client
from sluice.redis_server import ensure_redis

log = logging.getLogger("sluice.api")
API_PING_AFTER_IDLE = 0.05


async def _redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    # Detached: the embedded server is shared with the worker and outlives this process.
    handle = await anyio.to_thread.run_sync(lambda: ensure_redis(settings, detach=True))
    return handle.url


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for these settings (default: the environment's)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A connection idle for 50 ms is pinged before use (a round trip, ~0.17 ms here): a
        # database restart takes longer than that, so the first call after it finds a live
        # connection. Under load connections are busy and pay nothing.
        db = get_database(settings, ping_after_idle=API_PING_AFTER_IDLE)
        redis_url = await _redis_url(settings)
        celery = make_celery(settings, redis_url)
        # No read timeout: the long-poll listener waits on its pub/sub socket.
        redis = async_client(redis_url)
        listener = DoneListener(redis)
        gauge = QueueGauge(settings, db)
        app.state.sluice = AppState(settings, db, celery, redis, redis_url, listener, gauge)
        log.info("sluice api ready: database %s, redis %s", db.engine.url, redis_url)
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listener.run)
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            await redis.aclose()
            celery.close()
            db.dispose()

    app = FastAPI(
        title="Sluice",
        summary="Self-hosted batch inference with an OpenAI-Batch-compatible API",
        version="0.1.0",
        lifespan=lifespan,
        # Every route needs a live API key (api/auth.py), routes added later included; then
        # a query parameter the route does not declare is a 400 naming it (api/query.py).
        dependencies=[Depends(authenticate), Depends(refuse_unknown_query)],
        responses=AUTH_ERRORS,
        # /docs is served by api.hygiene from local files; ReDoc would load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    install_errors(app)
    install_guard(app, settings)
    # Outermost: a foreign Host or a credential-less state change is refused first.
    install_hygiene(app, settings)
    document_public_paths(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(deliveries.router)
    app.include_router(online.router)
    app.include_router(status.router)
    app.include_router(metrics.router)
    return app


def app() -> FastAPI:
    """Factory for `uvicorn --factory api.app:app`: settings come from the environment."""
    return create_app()


app_factory = app
