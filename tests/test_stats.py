"""Worker stats: a real runner and sim engine on SQLite publish their meter to a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sluice.config import Settings, load_settings
from sluice.db import Database
from sluice.migrate import upgrade
from sluice.queue import stats_key
from sluice.redis_server import ensure_redis, shutdown_embedded
from sluice.sampling import COMPLETIONS
from sluice.store.batches import create_job
from worker.engines.echo import EchoEngine
from worker.engines.sim import SimEngine, SimSettings
from worker.runner import Runner
from worker.stats import (
    STATS_TTL_SECONDS,
    StatsPublisher,
    publish_stats,
    read_stats,
)

MODEL = "sluice-sim"


# 2 ms per decode step, nothing else: a small, steady load to measure.
SIM_TIMING = SimSettings.load(
    sim_decode_step=0.002, sim_decode_per_seq=0.0, sim_prefill_per_token=0.0
)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    # redis_url=None: the embedded server, even when the environment names another Redis.
    s = load_settings(
        data_dir=tmp_path,
        redis_url=None,
        database_url=None,
        engine="sim",
        model=MODEL,
        max_num_seqs=4,
    )
    yield s
    shutdown_embedded(s)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    handle = ensure_redis(settings)
    c = redis.Redis.from_url(handle.url)
    yield c
    c.close()
    handle.stop()


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    yield database
    database.dispose()


def _jobs(db: Database, max_tokens: list[int]) -> list[int]:
    ids: list[int] = []
    for n in max_tokens:
        body: dict[str, Any] = {"model": MODEL, "prompt": "a b c", "max_tokens": n}
        created = create_job(db, owner="default", endpoint=COMPLETIONS, model=MODEL, body=body)
        ids.extend(created.request_ids)
    return ids


def test_publishes_meter_and_counters_of_a_real_run(
    settings: Settings, db: Database, client: redis.Redis
) -> None:
    engine = SimEngine(settings, SIM_TIMING)
    runner = Runner(settings, db, engine, owner="host:1:abc")
    lengths = [5, 3, 8, 1, 4, 6, 2, 7]
    ids = _jobs(db, lengths)
    runner.start()
    try:
        assert runner.submit(ids, priority=0).wait(30)
        published = publish_stats(client, "host:1:abc", engine, runner)
    finally:
        runner.stop()
    stored = read_stats(client)
    assert stored == {"host:1:abc": published}
    doc = stored["host:1:abc"]
    assert doc["engine"] == "sim" and doc["slots"] == 4
    assert doc["feed_mode"] == "continuous" and doc["inflight_target"] == 8
    assert (doc["completed"], doc["inflight"], doc["busy"]) == (8, 0, 0)
    # Every generated token is one busy slot in one step.
    assert doc["meter"]["tokens"] == sum(lengths)
    assert doc["meter"]["steps"] >= max(lengths)
    assert 0 < doc["meter"]["busy_slot_seconds"] <= doc["meter"]["slot_seconds"]
    assert 0 < doc["occupancy"] <= 1
    assert 0 < client.ttl(stats_key("host:1:abc")) <= STATS_TTL_SECONDS


def test_engine_without_meter_publishes_counters_only(
    settings: Settings, db: Database, client: redis.Redis
) -> None:
    engine = EchoEngine(load_settings(engine="echo", max_num_seqs=4))
    runner = Runner(settings.model_copy(update={"feed_mode": "batch"}), db, engine, owner="w2")
    doc = publish_stats(client, "w2", engine, runner)
    assert doc["meter"] is None and doc["occupancy"] is None
    assert doc["feed_mode"] == "batch" and doc["completed"] == 0
    assert json.loads(client.get(stats_key("w2")) or b"{}") == doc


def test_publisher_repeats_and_publishes_on_stop(
    settings: Settings, db: Database, client: redis.Redis
) -> None:
    engine = SimEngine(settings, SIM_TIMING)
    runner = Runner(settings, db, engine, owner="w3")
    publisher = StatsPublisher(client, "w3", engine, runner, interval=0.05)
    publisher.start()
    try:
        first = _wait_for(lambda: read_stats(client).get("w3"))
        later = _wait_for(
            lambda: d if (d := read_stats(client).get("w3")) and d["ts"] > first["ts"] else None
        )
        assert later["completed"] == 0
        # Work done after the last periodic publish still shows: stop() publishes once more.
        runner.start()
        try:
            assert runner.submit(_jobs(db, [3, 2]), priority=1).wait(30)
        finally:
            runner.stop()
    finally:
        publisher.stop()
    final = read_stats(client)["w3"]
    assert final["completed"] == 2 and final["meter"]["tokens"] == 5


def _wait_for(probe: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return dict(got)
        time.sleep(0.01)
    raise AssertionError("stats never appeared")
