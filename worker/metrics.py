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
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
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
    Chain,
    observe_many,
    process_collector,
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
        waits: dict[int, list[float]] = {}
        for c in claimed:
            if c.queued_at:
                waits.setdefault(c.priority, []).append(max(0.0, now - c.queued_at))
        with self._lock:
            for c in claimed:
                self._claimed_at[c.id] = now
        for priority, values in waits.items():
            observe_many(self._waits.get(priority) or self._waits[1], values)

    def written(self, results: Sequence[Result]) -> None:
        """One committed batch: statuses, tokens, engine times and the writer's lag."""
        if not results:
            return
        now = time.time()
        with self._lock:
            started = [self._claimed_at.pop(r.id, 0.0) for r in results]
        by_status: dict[str, int] = {}
        prompt = cached = generated = 0
        engine: list[float] = []
        oldest = now
        for r, start in zip(results, started, strict=True):
            by_status[r.status] = by_status.get(r.status, 0) + 1
            prompt += r.prompt_tokens
            cached += r.cached_tokens
            generated += r.completion_tokens
            if r.finished_at:
                oldest = min(oldest, r.finished_at)
                if start:
                    engine.append(max(0.0, r.finished_at - start))
        for status, n in by_status.items():
            counter = self._status.get(status) or REQUESTS_COMPLETED.labels(self.model, status)
            counter.inc(n)
        self._prompt.inc(prompt)
        self._cached.inc(cached)
        self._generated.inc(generated)
        self.tokens_generated += generated
        observe_many(self._engine_time, engine)
        self._lag.observe(max(0.0, now - oldest))

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


class MetricsServer:
    """prometheus_client's HTTP server for this worker's /metrics."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.port: int = server.server_address[1]

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(settings: Settings, collectors: Sequence[Any]) -> MetricsServer | None:
    """Start /metrics on SLUICE_WORKER_METRICS_PORT (None when the setting is unset)."""
    if settings.worker_metrics_port is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Chain([process_collector(settings.prometheus_multiproc_dir), *collectors]))
    server, thread = start_http_server(
        settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry
    )
    served = MetricsServer(server, thread)
    log.info("worker metrics at http://%s:%d/metrics", settings.worker_metrics_host, served.port)
    return served
