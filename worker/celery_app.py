"""The Celery side of the worker: a task per message that hands ids to the runner and
reports their progress until they are settled."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task, bootsteps
from celery.worker.control import inspect_command

from sluice.config import Settings
from sluice.logs import log_context
from sluice.queue import (
    LEGACY_TASK_NAME,
    PROGRESS_EVENT,
    TASK_NAME,
    describe_ids,
    make_celery,
)
from worker.kombu_fixes import harden_redis_transport
from worker.runner import Runner, RunnerFailed, Ticket

log = logging.getLogger("sluice.worker")

# A running task tells Flower how far its requests are at most this often (one event each:
# a 500-id message that takes a minute sends about 60, against 500 results written).
PROGRESS_EVERY = 1.0

_runner: Runner | None = None
_grace = 30.0


def set_runner(runner: Runner | None) -> None:
    """Install the process's runner (one engine per worker process)."""
    global _runner
    _runner = runner


def _running_runner() -> Runner:
    runner = _runner
    if runner is None:
        raise RuntimeError("the runner is not started in this process")
    if runner.failure:
        raise RunnerFailed(runner.failure)
    return runner


def _follow(task: Task, runner: Runner, ticket: Ticket, total: int) -> int:
    """Wait until the ticket's ids are settled, sending done/total as they move; returns done.

    The message was acked on receipt and the rows wait in the database, so waiting holds
    nothing but a pool thread: the runner claims these ids (or another worker steals them)
    whether or not this thread waits. Every way out settles the ticket: written, released by
    a drain (SIGTERM, and the drain step below when the consumer stops on its own), or a
    runner failure.
    """
    sent = -1
    while not ticket.wait(PROGRESS_EVERY):
        if runner.failure:
            break
        done = total - len(ticket.remaining)
        if done != sent:
            sent = done
            try:
                task.send_event(PROGRESS_EVENT, result={"done": done, "total": total},
                                done=done, total=total)  # fmt: skip
            except Exception as exc:  # Redis away: progress is cosmetic, the work goes on
                log.debug("could not send a progress event (%s)", exc)
    if runner.failure:
        raise RunnerFailed(runner.failure)
    return total - len(ticket.remaining)


class DrainStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Drain the runner before the pool stops: the pool waits for task threads, which wait
    for their tickets, which a drain settles (a stop with no signal, e.g. a dead consumer)."""

    requires = {"celery.worker.components:Pool"}

    def stop(self, parent: Any) -> None:
        """Start the runner's drain (it returns at once; idempotent)."""
        if _runner is not None:
            _runner.drain(_grace)


def create_worker_app(settings: Settings, redis_url: str, slots: int = 0) -> Celery:
    """The Celery app with the task registered; model, engine and slots in its conf."""
    global _grace
    _grace = settings.shutdown_grace
    # kombu reaching for a dropped connection must not kill the consumer (worker/kombu_fixes.py).
    harden_redis_transport()
    app = make_celery(settings, redis_url)
    # Flower's worker page shows the conf (its Config tab, and /api/workers): what this
    # worker serves, at a glance.
    app.conf.update(
        sluice_model=settings.served_model,
        sluice_engine=settings.engine,
        sluice_slots=slots,
        sluice_weights=settings.model,
    )
    app.steps["worker"].add(DrainStep)

    @app.task(name=TASK_NAME, bind=True, acks_late=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_batch(
        self: Task, batch_id: str, model: str, requests: int, ids: list[int], priority: int = 1
    ) -> dict[str, Any]:
        """Run these requests of a batch: hand the ids to the runner and follow them."""
        runner = _running_runner()
        with log_context(batch_id=batch_id, request_ids=describe_ids(ids, priority)):
            log.debug("following %d requests", len(ids))
            done = _follow(self, runner, runner.submit(ids, priority), len(ids))
            log.info("%d of %d requests settled", done, len(ids))
        return {"batch": batch_id, "model": model, "done": done, "total": requests}

    @app.task(name=LEGACY_TASK_NAME, acks_late=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_requests(ids: list[int], priority: int = 1) -> dict[str, Any]:
        """Messages published before tasks carried batch ids: hand the ids over, return."""
        _running_runner().submit(ids, priority)
        return {"requests": len(ids)}

    return app


@inspect_command()  # type: ignore[untyped-decorator]
def sluice(state: Any, **_kwargs: Any) -> dict[str, Any]:
    """`celery inspect sluice`: the model, engine and slots this worker serves, and its load."""
    conf = state.app.conf
    runner = _runner
    return {
        "model": conf.get("sluice_model"),
        "engine": conf.get("sluice_engine"),
        "slots": conf.get("sluice_slots"),
        "in_flight": len(runner.inflight_ids()) if runner is not None else 0,
        "failed": runner.failure if runner is not None else None,
    }
