"""The queue contract between api and worker: task name, queue names, message shape."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from celery import Celery

from sluice.config import Settings
from sluice.models import INTERACTIVE

# Named for what it does; Flower shows its arguments (batch id, model, request count).
TASK_NAME = "sluice.run_batch"
# The name before 0.x messages carried a batch id: still served, so queued messages run.
LEGACY_TASK_NAME = "sluice.run_requests"
# Celery event a running task sends with {done, total}: Flower shows it as state PROGRESS.
PROGRESS_EVENT = "task-progress"
# Pub/sub channels: cancellations reach workers, finished jobs wake long-polls.
CANCEL_CHANNEL = "sluice:cancel"
DONE_CHANNEL = "sluice:done"
RECONCILE_LOCK = "sluice:reconcile-lock"
# Each worker's stats document (worker/stats.py); its presence also says the worker came up.
STATS_PREFIX = "sluice:stats:"


def queue_name(model: str, priority: int) -> str:
    """One queue per model, with an interactive lane that workers read first."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    return f"sluice.{safe}.interactive" if priority == INTERACTIVE else f"sluice.{safe}"


def broker_url(redis_url: str) -> str:
    """Kombu spells a Unix socket redis+socket://; redis-py spells it unix://."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :]
    return redis_url


def make_celery(settings: Settings, redis_url: str) -> Celery:
    """A Celery app on the broker: one message at a time per pool thread, acked on receipt."""
    app = Celery("sluice", broker=broker_url(redis_url), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A message only names rows that wait, queued, in the database: acked on receipt.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        # A prefetched message is redelivered after this if its worker dies first.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_default_queue=queue_name(settings.served_model, 1),
    )
    return app


def chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    """Split request ids into messages of at most `size` ids."""
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def describe_ids(ids: Sequence[int], priority: int) -> str:
    """What Flower shows for a message's ids: a count and a range, never hundreds of ids."""
    lane = "interactive" if priority == INTERACTIVE else "bulk"
    span = f"{min(ids)}..{max(ids)}" if ids else "none"
    return repr({"ids": f"{len(ids)} request ids {span}", "priority": lane})


def publish(
    app: Celery,
    settings: Settings,
    model: str,
    priority: int,
    ids: Sequence[int],
    batch_id: str = "",
) -> int:
    """Send wake-up messages naming these request ids; returns the message count.

    The arguments are what an operator reads in Flower: batch id ("" when the reconciler
    republishes rows of several batches), model and request count; never prompts.
    """
    queue = queue_name(model, priority)
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunks(ids, settings.chunk_size):
            app.send_task(
                TASK_NAME,
                args=[batch_id or "requeued", model, len(chunk)],
                kwargs={"ids": chunk, "priority": priority},
                kwargsrepr=describe_ids(chunk, priority),
                queue=queue,
                producer=producer,
            )
            sent += 1
    return sent


def done_channel(batch_id: str) -> str:
    """Pub/sub channel that announces a batch or job has finished (wakes long-polls)."""
    return f"{DONE_CHANNEL}:{batch_id}"


def stats_key(owner: str) -> str:
    """The Redis key holding a worker's stats (owner: its lease owner name)."""
    return f"{STATS_PREFIX}{owner}"
