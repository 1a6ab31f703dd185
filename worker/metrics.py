"""A worker's metrics: what the runner counts as it writes, gauges read at scrape, /metrics.

The runner calls `RunnerMetrics` once per claim and once per written batch, never per
token or per engine step: at 10,000 requests/s a per-request lock would cost more than the
echo engine's whole work. `serve_metrics` starts prometheus_client's HTTP server on
SLUICE_WORKER_METRICS_PORT with this worker's counters, its engine and runner gauges and the
GPU (when NVML finds one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric

from sluice.config import Settings
from sluice.metrics import (
    CACHED_TOKENS,
    ENGINE_TIME,
    PRIORITY_LABELS,
    PROMPT_TOKENS,
    QUEUE_WAIT,
    REQUESTS_COMPLETED,
    TOKENS_GENERATED,
    WRITER_LAG,
    MetricsServer,
    observe_many,
    serve,
)
from sluice.store.work import Claimed, Result
from worker.engines.base import Engine
from worker.engines.meter import OccupancyMeter

log = logging.getLogger("sluice.worker")


class RunnerMetrics:
    """Counts one runner's claims and writes into the process's Prometheus metrics."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._claimed_at: dict[int, float] = {}  # request id -> claim time (wall clock)
        self._lock = threading.Lock()  # claimer and writer threads
        self._engine_time = ENGINE_TIME.labels(model)
        self._lag = WRITER_LAG.labels(model)
        self._waits = {p: QUEUE_WAIT.labels(model, name) for p, name in PRIORITY_LABELS.items()}
        self._status = {
            s: REQUESTS_COMPLETED.labels(model, s) for s in ("succeeded", "failed", "cancelled")
        }
        self._prompt = PROMPT_TOKENS.labels(model)
        self._cached = CACHED_TOKENS.labels(model)
        self._generated = TOKENS_GENERATED.labels(model)
        # Plain totals for the stats document's throughput (worker/stats.py).
        self.tokens_generated = 0

    def claimed(self, claimed: Sequence[Claimed]) -> None:
        """Rows just claimed: their time in the queue, and the clock for their engine time."""
        if not claimed:
            return
        now = time.time()
        with self._lock:
            self._claimed_at.update(dict.fromkeys([c.id for c in claimed], now))
        for priority in {c.priority for c in claimed}:
            # queued_at comes from the API host's clock: a skewed one must not go negative.
            waits = [
                max(0.0, now - c.queued_at)
                for c in claimed
                if c.priority == priority and c.queued_at
            ]
            observe_many(self._waits.get(priority) or self._waits[1], waits)

    def written(self, results: Sequence[Result]) -> None:
        """One committed batch: statuses, tokens, engine times and the writer's lag."""
        if not results:
            return
        now = time.time()
        with self._lock:
            pop = self._claimed_at.pop
            started = [pop(r.id, 0.0) for r in results]
        statuses = Counter(r.status for r in results)
        for status, n in statuses.items():
            counter = self._status.get(status) or REQUESTS_COMPLETED.labels(self.model, status)
            counter.inc(n)
        generated = sum(r.completion_tokens for r in results)
        self._prompt.inc(sum(r.prompt_tokens for r in results))
        self._cached.inc(sum(r.cached_tokens for r in results))
        self._generated.inc(generated)
        self.tokens_generated += generated
        finished = [r.finished_at for r in results if r.finished_at]
        engine = [
            max(0.0, r.finished_at - start)
            for r, start in zip(results, started, strict=True)
            if start and r.finished_at
        ]
        observe_many(self._engine_time, engine)
        if finished:
            self._lag.observe(max(0.0, now - min(finished)))

    def released(self, ids: Sequence[int]) -> None:
        """Rows given back to the queue unwritten: forget their claim times."""
        with self._lock:
            for rid in ids:
                self._claimed_at.pop(rid, None)


class RunnerGauges(Protocol):
    """What the scrape-time gauges read from a runner (worker.runner.Runner has it)."""

    target: int

    def inflight_ids(self) -> dict[int, str]:
        """Requests claimed and not yet written."""
        ...

    def writer_backlog(self) -> int:
        """Result groups the engine produced that the writer has not committed yet."""
        ...


# The gauges a worker computes at scrape time, with their help text.
WORKER_GAUGES = {
    "sluice_engine_slots": "Sequences the engine runs at once.",
    "sluice_engine_busy_slots": "Sequences running now.",
    "sluice_engine_occupancy_ratio": "Busy slot-seconds over slot-seconds since it started.",
    "sluice_runner_inflight": "Requests claimed and not yet written.",
    "sluice_runner_inflight_target": "Requests the runner keeps claimed.",
    "sluice_writer_backlog": "Result groups waiting for the writer's commit.",
}


class WorkerCollector:
    """Engine and runner gauges, read when Prometheus scrapes."""

    def __init__(self, owner: str, model: str, engine: Engine, runner: RunnerGauges) -> None:
        self.labels = [owner, model, engine.name]
        self.engine = engine
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        """Slots, busy slots, occupancy, in-flight requests and the writer's backlog."""
        meter = getattr(self.engine, "meter", None)
        values: dict[str, float] = {
            "sluice_engine_slots": self.engine.slots,
            "sluice_engine_busy_slots": self.engine.busy_slots(),
            "sluice_runner_inflight": len(self.runner.inflight_ids()),
            "sluice_runner_inflight_target": self.runner.target,
            "sluice_writer_backlog": self.runner.writer_backlog(),
        }
        if isinstance(meter, OccupancyMeter):  # engines without a meter: no occupancy
            values["sluice_engine_occupancy_ratio"] = meter.occupancy()
        for name, value in values.items():
            family = GaugeMetricFamily(
                name, WORKER_GAUGES[name], labels=["worker", "model", "engine"]
            )
            family.add_metric(self.labels, float(value))
            yield family


def serve_metrics(settings: Settings, collectors: Sequence[Any]) -> MetricsServer | None:
    """Start /metrics on SLUICE_WORKER_METRICS_PORT (None when the setting is unset)."""
    if settings.worker_metrics_port is None:
        return None
    served = serve(
        settings.worker_metrics_port,
        settings.worker_metrics_host,
        settings.prometheus_multiproc_dir,
        collectors,
    )
    log.info("worker metrics at http://%s:%d/metrics", settings.worker_metrics_host, served.port)
    return served
