"""Wake-ups after a commit: queue messages for new requests, cancel notices for workers.

The rows are already committed when these run, so a Redis outage must not fail the
request: idle workers claim rows that stay queued straight from the database.
"""

from __future__ import annotations

import logging

import anyio
from celery import Celery
from redis.asyncio import Redis

from sluice.config import Settings
from sluice.queue import CANCEL_CHANNEL, publish
from sluice.store.batches import Created

log = logging.getLogger("sluice.api")


async def publish_created(celery: Celery, settings: Settings, created: Created) -> bool:
    """Send the messages naming a new batch's or job's requests; False if Redis refused."""
    if not created.request_ids:
        return True
    try:
        # kombu's producer blocks on the socket: keep it off the event loop.
        await anyio.to_thread.run_sync(
            publish,
            celery,
            settings,
            created.model,
            created.priority,
            created.request_ids,
            created.batch_id,
        )
    except Exception as exc:
        log.warning(
            "could not publish %d requests of %s (%s); idle workers claim them from the database",
            len(created.request_ids),
            created.batch_id,
            exc,
            extra={"batch_id": created.batch_id},
        )
        return False
    return True


async def publish_cancel(redis: Redis, batch_id: str) -> bool:
    """Tell workers to abort this batch's running requests; False if Redis refused."""
    try:
        await redis.publish(CANCEL_CHANNEL, batch_id)
    except Exception as exc:
        # Workers also notice the cancelling status when they write results.
        log.warning("could not announce the cancel of %s (%s)", batch_id, exc)
        return False
    return True
