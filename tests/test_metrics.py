"""Prometheus metrics: scraped from real processes during a run, multiprocess sums, the GPU
absent on a CPU host, batch observation, and a Grafana dashboard that names real metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from api.metrics import Snapshot, SnapshotCollector
from api.workers import WorkerView
from sluice.config import load_settings
from sluice.errors import ConfigError
from sluice.metrics import (
    CACHED_TOKENS,
    ENGINE_TIME,
    GPU_METRICS,
    PROMPT_TOKENS,
    QUEUE_WAIT,
    REQUESTS_COMPLETED,
    TOKENS_GENERATED,
    WEBHOOK_DELIVERIES,
    WRITER_LAG,
    GpuCollector,
    exposition,
    observe_many,
)
from sluice.stack import free_port
from sluice.store.stats import QueueCount
from tests.e2e.conftest import BACKENDS, Running, start_stack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
N = 800  # requests: about 5 s on the sim engine below (32 slots, 20 tokens of 10 ms)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module", params=BACKENDS)
def sim_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Running, str]]:
    """API + a sim worker serving /metrics on its own port (SQLite and embedded Redis; also
    PostgreSQL and Redis when the environment names them)."""
    port = free_port()
    env = {
        "SLUICE_ENGINE": "sim",
        "SLUICE_MAX_NUM_SEQS": "32",
        "SLUICE_WORKER_METRICS_PORT": str(port),
    }
    backend = str(request.param)
    for running in start_stack(backend, tmp_path_factory.mktemp(f"metrics-{backend}"), **env):
        # The local admin key, where the stack has one (API keys): /metrics itself is public.
        running.http.headers.update(getattr(running.stack, "auth_headers", {}))
        yield running, f"http://127.0.0.1:{port}/metrics"


def _lines(model: str, n: int) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"count the sheep number {i}"}],
                "max_tokens": 20,
            },
        }
        for i in range(n)
    ]


def test_counters_move_during_a_run(sim_stack: tuple[Running, str]) -> None:
    sluice, worker_url = sim_stack
    api_url = f"{sluice.stack.url}/metrics"
    model = sluice.http.get("/v1/models").json()["data"][0]["id"]
    before = scrape(worker_url)
    done_before = value(before, "sluice_requests_completed_total", status="succeeded")
    batch_id = sluice.submit_file(_lines(model, N), "/v1/chat/completions")

    # While it runs: the queue is seen on the API, and the worker's counters are seen part
    # way (strictly between the start and the end), with its engine busy.
    seen_queue = seen_partial = seen_busy = 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        api = scrape(api_url)
        worker = scrape(worker_url)
        seen_queue = max(seen_queue, value(api, "sluice_queue_depth", model=model))
        done = value(worker, "sluice_requests_completed_total", status="succeeded") - done_before
        if 0 < done < N:
            seen_partial = done
            seen_busy = max(seen_busy, value(worker, "sluice_engine_busy_slots"))
        if done >= N:
            break
        time.sleep(0.2)
    finished = sluice.wait_batch(batch_id)
    assert finished["request_counts"]["completed"] == N, finished
    assert seen_queue > 0, "the API never showed queued requests"
    assert 0 < seen_partial < N, "no scrape landed during the run"
    assert seen_busy > 0, "the engine never looked busy"

    worker = scrape(worker_url)
    done = value(worker, "sluice_requests_completed_total", status="succeeded") - done_before
    assert done == N
    generated = value(worker, "sluice_tokens_generated_total", model=model)
    generated -= value(before, "sluice_tokens_generated_total", model=model)
    assert generated == 20 * N  # the sim engine generates exactly max_tokens
    assert value(worker, "sluice_prompt_tokens_total", model=model) > 0
    waits = value(worker, "sluice_queue_wait_seconds_count", priority="bulk")
    waits -= value(before, "sluice_queue_wait_seconds_count", priority="bulk")
    assert waits == N
    in_engine = value(worker, "sluice_engine_seconds_count") - value(
        before, "sluice_engine_seconds_count"
    )
    assert in_engine == N
    # 20 decode steps of at least 10 ms each: no request took less than 0.2 s in the engine.
    assert value(worker, "sluice_engine_seconds_bucket", le="0.1") == value(
        before, "sluice_engine_seconds_bucket", le="0.1"
    )
    assert value(worker, "sluice_writer_lag_seconds_count") > 0
    assert 0 < value(worker, "sluice_engine_occupancy_ratio") <= 1
    assert value(worker, "sluice_engine_slots") == 32
    # No GPU here: its families are simply absent, and the scrape still answers.
    assert not any(name.startswith("sluice_gpu_") for name, _ in worker)

    # The API sees workers through their stats, published every second: wait for the last.
    sluice.wait_for(lambda: value(scrape(api_url), "sluice_worker_completed") >= N, timeout=30)
    api = scrape(api_url)
    assert value(api, "sluice_queue_depth", model=model) == 0
    assert value(api, "sluice_workers", model=model, engine="sim") == 1
    assert value(api, "sluice_dependency_up", dependency="database") == 1
    assert value(api, "sluice_dependency_up", dependency="redis") == 1


def test_gpu_metrics_are_absent_without_nvml() -> None:
    gpu = GpuCollector()
    if gpu.available:
        pytest.skip("this host has an NVIDIA GPU")
    assert list(gpu.collect()) == []
    # The package missing altogether: still no error, still nothing.
    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from sluice.metrics import GpuCollector\n"
        "g = GpuCollector(); assert not g.available and list(g.collect()) == []; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_observe_many_matches_observe() -> None:
    registry = CollectorRegistry()
    buckets = (0.1, 1, 10)
    one = Histogram("one", "per value", ["m"], buckets=buckets, registry=registry)
    many = Histogram("many", "in bulk", ["m"], buckets=buckets, registry=registry)
    values = [0.0, 0.05, 0.1, 0.1000001, 0.5, 1, 3, 10, 11, 1e9]
    for v in values:
        one.labels("x").observe(v)
    observe_many(many.labels("x"), values)
    got = {
        s.name.removeprefix("one").removeprefix("many") + str(s.labels): s.value
        for f in registry.collect()
        for s in f.samples
        if f.name == "one" and not s.name.endswith("_created")
    }
    got_many = {
        s.name.removeprefix("many") + str(s.labels): s.value
        for f in registry.collect()
        for s in f.samples
        if f.name == "many" and not s.name.endswith("_created")
    }
    assert got == got_many
    assert got["_bucket{'m': 'x', 'le': '0.1'}"] == 3  # le is inclusive: 0.1 itself counts


def test_multiprocess_mode_adds_processes_up(tmp_path: Path) -> None:
    # Two real processes count into the directory; one exposition reads both.
    code = (
        "from sluice.metrics import count_webhook\n"
        "from sluice.store.deliveries import Outcome\n"
        "for _ in range(3): count_webhook(Outcome.SUCCEEDED)\n"
        "count_webhook(Outcome.RETRYING)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    text = exposition(tmp_path).decode()
    samples = {
        (s.name, s.labels.get("outcome")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("sluice_webhook_deliveries_total", "succeeded")] == 6
    assert samples[("sluice_webhook_deliveries_total", "retrying")] == 2


def test_a_missing_multiproc_dir_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"PROMETHEUS_MULTIPROC_DIR=.* is not a directory"):
        load_settings(prometheus_multiproc_dir=tmp_path / "missing")
    assert load_settings(prometheus_multiproc_dir=tmp_path).prometheus_multiproc_dir == tmp_path


def _known_metrics() -> set[str]:
    """Every series name Sluice exports (counters and histograms with their suffixes)."""
    names: set[str] = set(GPU_METRICS)
    for counter in (REQUESTS_COMPLETED, PROMPT_TOKENS, CACHED_TOKENS, TOKENS_GENERATED,
                    WEBHOOK_DELIVERIES):  # fmt: skip
        names.add(f"{counter._name}_total")
    for hist in (QUEUE_WAIT, ENGINE_TIME, WRITER_LAG):
        names |= {f"{hist._name}_{s}" for s in ("bucket", "sum", "count")}
    worker = WorkerView(
        owner="w", model="m", engine="sim", state="running", live=True, last_seen_seconds=0.1,
        slots=1, busy=1, inflight=1, occupancy=0.5, completed=1,
    )  # fmt: skip
    snap = Snapshot(["m"], [QueueCount("m", 1, "queued", 1)], {"in_progress": 1}, [worker])
    snap.up = {"database": True}
    names |= {f.name for f in SnapshotCollector(snap).collect()}
    from worker.metrics import WORKER_GAUGES

    return names | set(WORKER_GAUGES)


def test_grafana_dashboard_names_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 10
    known = _known_metrics()
    used: set[str] = set()
    for expr in exprs:
        # Metric names: identifiers not followed by "(" (functions) nor inside {..} or [..].
        stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
        words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", stripped))
        metrics = {w for w in words if w.startswith("sluice_")}
        assert metrics, f"no Sluice metric in {expr!r}"
        unknown = metrics - known
        assert not unknown, f"{expr!r} names metrics that do not exist: {unknown}"
        used |= metrics
    # The list, each on the dashboard.
    for must in (
        "sluice_queue_depth", "sluice_requests", "sluice_requests_completed_total",
        "sluice_tokens_generated_total", "sluice_queue_wait_seconds_bucket",
        "sluice_engine_seconds_bucket", "sluice_engine_occupancy_ratio",
        "sluice_writer_lag_seconds_bucket", "sluice_cached_tokens_total",
        "sluice_webhook_deliveries_total", "sluice_gpu_utilization_ratio",
        "sluice_gpu_memory_used_bytes", "sluice_gpu_temperature_celsius", "sluice_gpu_power_watts",
    ):  # fmt: skip
        assert must in used, f"the dashboard has no panel on {must}"
