"""GET /metrics: Prometheus text, with the cluster's state read at scrape time.

The queue (from the database), live workers (from their stats in Redis) and dependency health
are computed when Prometheus scrapes, so any API process answers the same; the process's own
counters come from prometheus_client (added up over processes in multiprocess mode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anyio
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client.core import GaugeMetricFamily, Metric

from api.deps import StateDep
from api.workers import WorkerView, read_workers
from sluice.metrics import CONTENT_TYPE, PRIORITY_LABELS, exposition
from sluice.store.stats import QueueCount, active_batch_counts, queue_counts

router = APIRouter()
log = logging.getLogger("sluice.api")
# A scrape never waits longer than this on either store (Prometheus' default timeout: 10 s).
SCRAPE_TIMEOUT = 3.0


@dataclass
class Snapshot:
    """What one scrape read from the database and Redis (empty parts: that store is down)."""

    models: list[str]
    queue: list[QueueCount] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerView] = field(default_factory=list)
    up: dict[str, bool] = field(default_factory=dict)


class SnapshotCollector:
    """Serves a Snapshot as gauges."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        """Queue depth, live requests, active batches, workers and dependency health."""
        snap = self.snap
        depth = GaugeMetricFamily(
            "sluice_queue_depth", "Requests queued, by model and priority.",
            labels=["model", "priority"],
        )  # fmt: skip
        live = GaugeMetricFamily(
            "sluice_requests", "Requests queued or running, by model, priority and status.",
            labels=["model", "priority", "status"],
        )  # fmt: skip
        queued = {(m, p): 0 for m in snap.models for p in PRIORITY_LABELS}
        for c in snap.queue:
            prio = PRIORITY_LABELS.get(c.priority, str(c.priority))
            live.add_metric([c.model, prio, c.status], c.count)
            if c.status == "queued":
                queued[(c.model, c.priority)] = queued.get((c.model, c.priority), 0) + c.count
        for (model, priority), n in sorted(queued.items()):
            depth.add_metric([model, PRIORITY_LABELS.get(priority, str(priority))], n)
        yield depth
        yield live
        active = GaugeMetricFamily(
            "sluice_batches_active", "Batches and jobs not finished, by status.", labels=["status"]
        )
        for status, n in sorted(snap.batches.items()):
            active.add_metric([status], n)
        yield active
        yield from self._workers()
        up = GaugeMetricFamily(
            "sluice_dependency_up", "1 when the API reached it at this scrape.",
            labels=["dependency"],
        )  # fmt: skip
        for name, ok in sorted(snap.up.items()):
            up.add_metric([name], 1.0 if ok else 0.0)
        yield up

    def _workers(self) -> Iterator[Metric]:
        count = GaugeMetricFamily(
            "sluice_workers", "Live workers, by model and engine.", labels=["model", "engine"]
        )
        live: dict[tuple[str, str], int] = {(m, ""): 0 for m in self.snap.models}
        for w in self.snap.workers:
            if w.live:
                live.pop((w.model, ""), None)
                live[(w.model, w.engine)] = live.get((w.model, w.engine), 0) + 1
        for (model, engine), n in sorted(live.items()):
            count.add_metric([model, engine], n)
        yield count
        labels = ["worker", "model", "engine"]
        per_worker: list[tuple[str, str, Callable[[WorkerView], float]]] = [
            ("sluice_worker_slots", "Engine slots.", lambda w: w.slots),
            ("sluice_worker_busy_slots", "Sequences in the engine.", lambda w: w.busy),
            ("sluice_worker_inflight", "Requests claimed, not yet written.", lambda w: w.inflight),
            ("sluice_worker_occupancy_ratio", "Busy slot-seconds over slot-seconds.",
             lambda w: w.occupancy or 0.0),
            ("sluice_worker_completed", "Requests written since it started.",
             lambda w: w.completed),
            ("sluice_worker_last_seen_seconds", "Seconds since its last stats.",
             lambda w: w.last_seen_seconds),
        ]  # fmt: skip
        for name, doc, read in per_worker:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for w in self.snap.workers:
                if w.state == "running":
                    family.add_metric([w.owner, w.model, w.engine], float(read(w)))
            yield family


async def snapshot(state: StateDep) -> Snapshot:
    """Read the queue, active batches and workers; a store that fails is marked down."""
    models = state.settings.accepted_models
    snap = Snapshot(models=models)
    try:
        with anyio.fail_after(SCRAPE_TIMEOUT):
            snap.queue = await anyio.to_thread.run_sync(
                queue_counts, state.db, models, abandon_on_cancel=True
            )
            snap.batches = await anyio.to_thread.run_sync(
                active_batch_counts, state.db, abandon_on_cancel=True
            )
        snap.up["database"] = True
    except Exception as exc:
        log.warning("metrics: the database is down (%s: %s)", type(exc).__name__, exc)
        snap.up["database"] = False
    try:
        with anyio.fail_after(SCRAPE_TIMEOUT):
            snap.workers = await read_workers(state.redis, state.settings.worker_stale_seconds)
        snap.up["redis"] = True
    except Exception as exc:
        log.warning("metrics: Redis is down (%s: %s)", type(exc).__name__, exc)
        snap.up["redis"] = False
    return snap


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition: process counters plus the cluster's state now."""
    snap = await snapshot(state)
    body = exposition(state.settings.prometheus_multiproc_dir, SnapshotCollector(snap))
    return Response(body, media_type=CONTENT_TYPE)
