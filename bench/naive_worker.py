"""The naive design bench/e2e.py compares against: one Celery task per prompt, one commit each.

Each task carries one request's id and body; a pool thread runs it through the echo engine
and writes its result at once (one UPDATE, one commit). Start it as a real worker:

    SLUICE_DATABASE_URL=... SLUICE_REDIS_URL=... \\
        celery -A bench.naive_worker worker -P threads -c 8 -Q naive
"""

from __future__ import annotations

import threading
from functools import lru_cache

from celery import Celery
from celery.signals import worker_init
from sqlalchemy import update

from sluice.config import load_settings
from sluice.db import Database
from sluice.errors import RequestRejected
from sluice.ids import now
from sluice.models import BULK, FAILED, SUCCEEDED, requests
from sluice.queue import broker_url
from sluice.store.work import Claimed
from worker.engines import load_engine
from worker.engines.base import Engine
from worker.prepare import to_gen_request

QUEUE = "naive"
TASK = "bench.naive.run_prompt"

# Read at import (bench/e2e.py imports the names above without a backend in its environment).
settings = load_settings(engine="echo")
app = Celery(
    "naive",
    broker=broker_url(settings.redis_url) if settings.redis_url else None,
    set_as_current=False,
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
)
# The engine interface is single-threaded: each pool thread gets its own echo engine.
_local = threading.local()


@worker_init.connect  # type: ignore[untyped-decorator]
def _check(**_: object) -> None:
    if settings.redis_url is None or settings.database_url is None:
        raise SystemExit("the naive worker needs SLUICE_REDIS_URL and SLUICE_DATABASE_URL")


@lru_cache(maxsize=1)
def _db() -> Database:
    return Database(settings.resolved_database_url)


def _engine() -> Engine:
    engine: Engine | None = getattr(_local, "engine", None)
    if engine is None:
        engine = _local.engine = load_engine(settings)
    return engine


@app.task(name=TASK, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
def run_prompt(request_id: int, endpoint: str, body: str) -> None:
    """Run one prompt and commit its result on its own."""
    engine = _engine()
    claimed = Claimed(request_id, "", endpoint, BULK, 1, 0, body, from_file=False)
    try:
        engine.add(to_gen_request(claimed, engine))
        [res] = engine.step()
        values: dict[str, object] = {
            "status": SUCCEEDED if res.error is None else FAILED,
            "output_text": res.text,
            "finish_reason": res.finish_reason,
            "error_message": res.error,
            "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens,
        }
    except RequestRejected as exc:
        values = {"status": FAILED, "error_code": exc.code, "error_message": exc.message}
    with _db().write() as conn:
        conn.execute(
            update(requests)
            .where(requests.c.id == request_id)
            .values(**values, finished_at=now(), lease_expires_at=None)
        )
