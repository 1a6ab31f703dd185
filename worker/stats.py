"""Worker stats in Redis: each worker publishes its engine's occupancy meter and counters.

A worker writes one JSON document to `sluice:stats:<owner>` every second and once more at
shutdown; the key expires on its own, so a worker that died stops being listed. Benchmarks
and operators read every worker's document with `read_stats` (the meter lives in the worker
process, so this is how anything outside it sees how full the engine was kept).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Any, Protocol

import redis

from sluice.queue import STATS_PREFIX, stats_key
from worker.engines.base import Engine
from worker.engines.meter import OccupancyMeter

log = logging.getLogger("sluice.worker")

# Several missed publishes before a key vanishes: a busy worker is not mistaken for a dead one.
STATS_TTL_SECONDS = 30
# Throughput in the stats is averaged over this many seconds (ten publishes).
RATE_WINDOW = 10.0


class RunnerCounters(Protocol):
    """What stats read from a runner (worker.runner.Runner has all of it)."""

    completed: int
    target: int
    batch_mode: bool

    def inflight_ids(self) -> dict[int, str]:
        """Requests claimed and not yet written."""
        ...


def collect_stats(
    owner: str, engine: Engine, runner: RunnerCounters, model: str = "", state: str = "running"
) -> dict[str, Any]:
    """One worker's stats now: identity, counters, and the engine's meter (when it has one)."""
    meter = getattr(engine, "meter", None)
    snapshot = meter.snapshot() if isinstance(meter, OccupancyMeter) else None
    occupancy = meter.occupancy() if isinstance(meter, OccupancyMeter) else None
    return {
        "owner": owner,
        "pid": os.getpid(),
        "ts": time.time(),
        "engine": engine.name,
        # The model it serves (readiness, `sluice status`); "stopped" in the final publish.
        "model": model,
        "state": state,
        "slots": engine.slots,
        "feed_mode": "batch" if runner.batch_mode else "continuous",
        "inflight_target": runner.target,
        "completed": runner.completed,
        "inflight": len(runner.inflight_ids()),
        "busy": engine.busy_slots(),
        "meter": snapshot,
        "occupancy": occupancy,
    }


def publish_stats(
    client: redis.Redis,
    owner: str,
    engine: Engine,
    runner: RunnerCounters,
    model: str = "",
    state: str = "running",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write this worker's stats to `sluice:stats:<owner>` (expiring) and return them."""
    stats = {**collect_stats(owner, engine, runner, model, state), **(extra or {})}
    client.set(stats_key(owner), json.dumps(stats), ex=STATS_TTL_SECONDS)
    return stats


def read_stats(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every live worker's latest stats, by owner."""
    keys = sorted(client.scan_iter(match=f"{STATS_PREFIX}*", count=1000))
    if not keys:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for raw in client.mget(keys):
        if raw is not None:  # expired between SCAN and MGET
            doc = json.loads(raw)
            out[str(doc["owner"])] = doc
    return out


class StatsPublisher:
    """A daemon thread that publishes every `interval` seconds, and once more on stop()."""

    def __init__(
        self,
        client: redis.Redis,
        owner: str,
        engine: Engine,
        runner: RunnerCounters,
        interval: float = 1.0,
        model: str = "",
    ) -> None:
        self.client = client
        self.model = model
        self._state = "running"
        # (time, requests written, tokens generated): throughput over the last RATE_WINDOW.
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque()
        self.owner = owner
        self.engine = engine
        self.runner = runner
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-stats", daemon=True)

    def start(self) -> None:
        """Publish now, then every interval in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and publish the final numbers."""
        self._stop.set()
        self._thread.join(10)
        self._state = "stopped"
        self._publish()

    def _loop(self) -> None:
        self._publish()
        while not self._stop.wait(self.interval):
            self._publish()

    def _rates(self) -> dict[str, float]:
        """Requests and tokens per second over the last RATE_WINDOW seconds."""
        metrics = getattr(self.runner, "metrics", None)
        tokens = int(getattr(metrics, "tokens_generated", 0))
        now = time.monotonic()
        self._samples.append((now, self.runner.completed, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        t0, done0, tokens0 = self._samples[0]
        span = now - t0
        if span <= 0:
            return {"requests_per_second": 0.0, "tokens_per_second": 0.0}
        return {
            "requests_per_second": round((self.runner.completed - done0) / span, 3),
            "tokens_per_second": round((tokens - tokens0) / span, 3),
        }

    def _publish(self) -> None:
        try:
            publish_stats(
                self.client, self.owner, self.engine, self.runner, self.model, self._state,
                self._rates(),
            )  # fmt: skip
        except redis.RedisError:
            # Stats are advisory: a Redis hiccup must not disturb the work.
            log.warning("could not publish worker stats", exc_info=True)
