"""`sluice worker`: load the engine once, start the runner, then serve Celery messages."""

from __future__ import annotations

import logging
import os
import socket
import uuid

from celery.signals import worker_shutting_down

from sluice.config import Settings
from sluice.db import get_database
from sluice.metrics import GpuCollector
from sluice.queue import done_channel, queue_name
from sluice.redis_clients import sync_client
from worker.celery_app import create_worker_app, set_runner
from worker.deltas import DeltaPublisher
from worker.engines import load_engine
from worker.faults import Faults
from worker.listener import CancelListener
from worker.metrics import WorkerCollector, serve_metrics
from worker.reconciler import Reconciler
from worker.runner import Runner
from worker.stats import StatsPublisher

log = logging.getLogger("sluice.worker")


def run_worker(settings: Settings, redis_url: str, loglevel: str = "INFO") -> int:
    """Run one worker process until SIGTERM/SIGINT; returns its exit code.

    Warm shutdown drains the runner: the engine's work gets the grace, the rest of what this
    worker claimed goes back to the queue at once.
    """
    owner = settings.worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    faults = Faults.parse(settings.faults)
    db = get_database(settings)
    client = sync_client(redis_url)
    faults.before_load()
    engine = load_engine(settings)
    log.info(
        "engine %s loaded: model %s, %d slots", settings.engine, settings.served_model, engine.slots
    )

    def announce(batch_ids: list[str]) -> None:
        for bid in batch_ids:
            client.publish(done_channel(bid), "done")

    deltas = DeltaPublisher(client)
    runner = Runner(settings, db, engine, owner, on_finished=announce, faults=faults, deltas=deltas)
    app = create_worker_app(settings, redis_url, engine.slots)
    reconciler = Reconciler(settings, db, app, client, owner, runner, announce)
    listener = CancelListener(client, runner.abort_batch)
    stats = StatsPublisher(client, owner, engine, runner, model=settings.served_model)
    # /metrics when SLUICE_WORKER_METRICS_PORT is set: counters, engine gauges, the GPU.
    metrics = None
    if settings.worker_metrics_port is not None:
        gauges = WorkerCollector(owner, settings.served_model, engine, runner)
        metrics = serve_metrics(settings, [gauges, GpuCollector()])
    set_runner(runner)

    def drain_on_shutdown(**_kwargs: object) -> None:
        # Celery's warm shutdown waits for the task threads; draining settles their tickets.
        runner.drain(settings.shutdown_grace)

    worker_shutting_down.connect(drain_on_shutdown, weak=False)
    runner.start()
    reconciler.start()
    listener.start()
    deltas.start()
    stats.start()
    model = settings.served_model
    worker = app.Worker(
        pool="threads",
        concurrency=settings.resolved_worker_threads,
        queues=[queue_name(model, 0), queue_name(model, 1)],
        hostname=f"sluice-{settings.engine}@{owner}",
        loglevel=loglevel,
        without_mingle=True,
        without_gossip=True,
        # JSON logs: no banner, so every line the worker writes parses.
        quiet=settings.log_format == "json",
    )
    try:
        worker.start()
    finally:
        listener.stop()
        reconciler.stop()
        # Also when the consumer died on its own (no signal, so no drain yet).
        runner.drain(settings.shutdown_grace)
        runner.stop(settings.shutdown_grace + 5)
        # After the runner: the last publish includes the last writes.
        stats.stop()
        deltas.stop()
        if metrics is not None:
            metrics.stop()
        set_runner(None)
        engine.close()
        db.dispose()
    # Celery's own code: non-zero when the consumer died, so a supervisor restarts the worker.
    return int(worker.exitcode or 0)
