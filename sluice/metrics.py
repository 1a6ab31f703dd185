"""Prometheus metrics both services share: the counters' names, batch observation, the GPU.

Counters and histograms live in the process that does the work (a worker counts what it
wrote, whoever delivers webhooks counts deliveries) and are served by that process's
`/metrics`. Gauges of shared state (queue depth, workers) are computed at scrape time by
collectors (api/metrics.py, worker/metrics.py), so they are right whichever process answers.

Multiprocess: prometheus_client itself reads PROMETHEUS_MULTIPROC_DIR when it is imported;
with it set, values live in files there and `exposition` adds them up across processes (the
API under several uvicorn workers). Without it, each process serves its own registry.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger("sluice.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
PRIORITY_LABELS = {0: "interactive", 1: "bulk"}

# Seconds: interactive waits are sub-second, bulk waits run to hours behind a large file.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
# Seconds in the engine: short outputs take ~0.1 s, 2k-token outputs a minute or more.
ENGINE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600)
# Writer lag: a result waits for the next bulk commit, normally a few milliseconds.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)

REQUESTS_COMPLETED = Counter(
    "sluice_requests_completed",
    "Requests a worker finished and wrote, by model and final status.",
    ["model", "status"],
)
PROMPT_TOKENS = Counter(
    "sluice_prompt_tokens", "Prompt tokens of the requests written, by model.", ["model"]
)
CACHED_TOKENS = Counter(
    "sluice_cached_tokens",
    "Prompt tokens the engine's prefix cache served (hit rate: over sluice_prompt_tokens).",
    ["model"],
)
TOKENS_GENERATED = Counter(
    "sluice_tokens_generated", "Completion tokens generated and written, by model.", ["model"]
)
QUEUE_WAIT = Histogram(
    "sluice_queue_wait_seconds",
    "Time a request waited queued before a worker claimed it.",
    ["model", "priority"],
    buckets=WAIT_BUCKETS,
)
ENGINE_TIME = Histogram(
    "sluice_engine_seconds",
    "Time from a request's claim to its result leaving the engine.",
    ["model"],
    buckets=ENGINE_BUCKETS,
)
WRITER_LAG = Histogram(
    "sluice_writer_lag_seconds",
    "Per written batch: how long its oldest result waited between engine and commit.",
    ["model"],
    buckets=LAG_BUCKETS,
)
# livesum: in multiprocess mode, the sum over the API processes alive now.
WAITING = Gauge(
    "sluice_api_waiting",
    "Requests an API process holds open waiting for an answer (long polls, online requests).",
    multiprocess_mode="livesum",
)
WEBHOOK_DELIVERIES = Counter(
    "sluice_webhook_deliveries",
    "Webhook delivery attempts by outcome (sluice.store.deliveries.Outcome: succeeded, "
    "retrying, failed, disabled).",
    ["outcome"],
)


def count_webhook(outcome: str) -> None:
    """Count one webhook delivery attempt by its outcome (sluice_webhook_deliveries_total).

    The sender passes its attempt's Outcome (a StrEnum): succeeded, retrying (failed, will be
    retried), failed (no more attempts) or disabled (the endpoint answered 410).
    """
    WEBHOOK_DELIVERIES.labels(str(outcome)).inc()


def observe_many(histogram: Any, values: Sequence[float]) -> None:
    """Observe many values into one labelled histogram with one increment per bucket.

    The worker observes hundreds of requests per written batch: per-value observe() takes a
    lock per value (~1.5 us each here); counting buckets first costs one bisect per value.
    """
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # another client version
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))


class Collector(Protocol):
    """Anything prometheus_client can collect from."""

    def collect(self) -> Iterable[Metric]:
        """The metric families now."""
        ...


class Chain:
    """Several collectors served as one."""

    def __init__(self, parts: Sequence[Collector]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


def process_collector(multiproc_dir: Path | None) -> Collector:
    """This process's registered metrics, or every process's when multiprocess mode is on."""
    if multiproc_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    return registry


def exposition(multiproc_dir: Path | None, *extra: Collector) -> bytes:
    """The text exposition of the process metrics plus scrape-time collectors."""
    return generate_latest(Chain([process_collector(multiproc_dir), *extra]))


class MetricsServer:
    """prometheus_client's HTTP server for a process's /metrics."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.port: int = server.server_address[1]

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(
    port: int, host: str, multiproc_dir: Path | None, collectors: Sequence[Collector] = ()
) -> MetricsServer:
    """Serve this process's metrics plus `collectors` at http://host:port/metrics (0: any port).

    For processes without an HTTP server of their own: a worker, a webhook sender.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Chain([process_collector(multiproc_dir), *collectors]))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


# What GpuCollector reports per GPU (labels gpu, name), where NVML can read it.
GPU_METRICS = {
    "sluice_gpu_utilization_ratio": "GPU busy fraction.",
    "sluice_gpu_memory_used_bytes": "GPU memory used.",
    "sluice_gpu_memory_total_bytes": "GPU memory.",
    "sluice_gpu_temperature_celsius": "GPU temperature.",
    "sluice_gpu_power_watts": "GPU power draw.",
}


class GpuCollector:
    """GPU utilisation, memory, temperature and power through NVML; nothing without one.

    nvidia-ml-py is optional (the vllm extra brings it): absent, or present on a host with no
    NVIDIA driver, this collector yields no metrics and never fails a scrape.
    """

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[tuple[str, str, Any]] = []  # (index, name, handle)
        try:
            pynvml = importlib.import_module("pynvml")  # nvidia-ml-py, untyped

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                self._handles.append((str(i), name, handle))
            self._nvml = pynvml
        except Exception as exc:  # ImportError, or NVMLError without a driver: no GPU here
            log.debug("no GPU metrics: %s", exc)
            self._handles = []

    @property
    def available(self) -> bool:
        """True when NVML answered and found at least one GPU."""
        return bool(self._handles)

    def collect(self) -> Iterator[Metric]:
        """One family per reading, a sample per GPU; a reading a GPU lacks is skipped."""
        if not self._handles:
            return
        nvml = self._nvml
        reads: dict[str, Callable[[Any], float]] = {
            "sluice_gpu_utilization_ratio": lambda h: (
                nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100
            ),
            "sluice_gpu_memory_used_bytes": lambda h: float(nvml.nvmlDeviceGetMemoryInfo(h).used),
            "sluice_gpu_memory_total_bytes": lambda h: float(nvml.nvmlDeviceGetMemoryInfo(h).total),
            "sluice_gpu_temperature_celsius": lambda h: float(
                nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            ),
            "sluice_gpu_power_watts": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000,  # mW
        }
        for name, read in reads.items():
            family = GaugeMetricFamily(name, GPU_METRICS[name], labels=["gpu", "name"])
            for index, gpu_name, handle in self._handles:
                try:
                    family.add_metric([index, gpu_name], float(read(handle)))
                except Exception:  # e.g. NVML_ERROR_NOT_SUPPORTED: power on some boards
                    continue
            yield family
