"""The Celery side of the worker: one thin task that hands ids to the runner and waits."""

from __future__ import annotations

from typing import Any

from celery import Celery

from sluice.config import Settings
from sluice.queue import TASK_NAME, make_celery
from worker.runner import Runner, RunnerFailed

# How often a task thread waiting on its ticket checks that the runner is still alive.
TICKET_POLL_SECONDS = 1.0

_runner: Runner | None = None


def set_runner(runner: Runner | None) -> None:
    """Install the process's runner (one engine per worker process)."""
    global _runner
    _runner = runner


def create_worker_app(settings: Settings, redis_url: str) -> Celery:
    """The Celery app with the task registered."""
    app = make_celery(settings, redis_url)

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
    def run_requests(ids: list[int], priority: int = 1) -> dict[str, Any]:
        """Run these requests; return once their results are committed (then Celery acks)."""
        runner = _runner
        if runner is None:
            raise RuntimeError("the runner is not started in this process")
        ticket = runner.submit(ids, priority)
        while not ticket.wait(TICKET_POLL_SECONDS):
            if runner.failure:
                break
        if runner.failure:
            # The process is exiting; the rows are back in the database's queue.
            raise RunnerFailed(runner.failure)
        return {"requests": len(ids)}

    return app
