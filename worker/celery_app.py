"""The Celery side of the worker: one thin task that hands ids to the runner and waits."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.transport import redis as kombu_redis

from sluice.config import Settings
from sluice.queue import TASK_NAME, make_celery
from worker.runner import Runner, RunnerFailed

_runner: Runner | None = None


def set_runner(runner: Runner | None) -> None:
    """Install the process's runner (one engine per worker process)."""
    global _runner
    _runner = runner


def create_worker_app(settings: Settings, redis_url: str) -> Celery:
    """The Celery app with the task registered."""
    # Messages are wake-ups (the database is the queue): nothing needs putting back when a
    # channel closes. kombu 5.7 tries to anyway after a lost connection, through the pool of
    # a connection it has already dropped, and the AttributeError kills the consumer.
    kombu_redis.QoS.restore_at_shutdown = False
    app = make_celery(settings, redis_url)

    @app.task(name=TASK_NAME, acks_late=False, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_requests(ids: list[int], priority: int = 1) -> dict[str, Any]:
        """Hand these ids to the runner and return at once (the message is acked on receipt).

        Nothing is held: the rows are queued in the database, where this worker claims them
        as the engine has room, or another worker's idle poll does if this one dies. Holding
        messages until their results were written meant hundreds of unacked messages per
        worker, shutdowns that waited for all of them, and late acks on a channel that a
        Redis restart had closed (kombu's AttributeError on them kills the consumer).
        """
        runner = _runner
        if runner is None:
            raise RuntimeError("the runner is not started in this process")
        if runner.failure:
            raise RunnerFailed(runner.failure)
        runner.submit(ids, priority)
        return {"requests": len(ids)}

    return app
