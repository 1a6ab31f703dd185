"""The workers the API can see: each publishes `sluice:stats:<owner>` in Redis every second."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from sluice.queue import STATS_PREFIX


class WorkerView(BaseModel):
    """One worker as its last stats document describes it."""

    owner: str = Field(description="The worker's id (it names its leases).")
    model: str = Field(description="The model it serves (empty from workers before 0.2).")
    engine: str
    state: str = Field(description="running, or stopped (its final publish).")
    live: bool = Field(description="Running and published within SLUICE_WORKER_STALE_SECONDS.")
    last_seen_seconds: float = Field(description="Seconds since its last publish.")
    slots: int
    busy: int = Field(description="Sequences in its engine now.")
    inflight: int = Field(description="Requests it has claimed and not yet written.")
    occupancy: float | None = Field(description="Busy slot-seconds over slot-seconds.")
    completed: int = Field(description="Requests it has written since it started.")
    requests_per_second: float = Field(0.0, description="Written, over the last 10 s.")
    tokens_per_second: float = Field(0.0, description="Generated, over the last 10 s.")


def _view(doc: dict[str, Any], now: float, stale: float) -> WorkerView:
    age = max(0.0, now - float(doc.get("ts", 0.0)))
    state = str(doc.get("state", "running"))
    return WorkerView(
        owner=str(doc.get("owner", "")),
        model=str(doc.get("model", "")),
        engine=str(doc.get("engine", "")),
        state=state,
        live=state == "running" and age <= stale,
        last_seen_seconds=round(age, 3),
        slots=int(doc.get("slots", 0)),
        busy=int(doc.get("busy", 0)),
        inflight=int(doc.get("inflight", 0)),
        occupancy=doc.get("occupancy"),
        completed=int(doc.get("completed", 0)),
        requests_per_second=float(doc.get("requests_per_second", 0.0)),
        tokens_per_second=float(doc.get("tokens_per_second", 0.0)),
    )


async def read_workers(redis: Redis, stale_seconds: float) -> list[WorkerView]:
    """Every worker whose stats key has not expired (dead ones vanish within 30 s)."""
    keys = [key async for key in redis.scan_iter(match=f"{STATS_PREFIX}*", count=1000)]
    if not keys:
        return []
    now = time.time()
    views = []
    for raw in await redis.mget(sorted(keys)):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            views.append(_view(json.loads(raw), now, stale_seconds))
        except (ValueError, TypeError):
            continue  # not a stats document: skip it rather than fail a health check
    return sorted(views, key=lambda v: (v.model, v.owner))


def models_without_worker(workers: Iterable[WorkerView], models: Iterable[str]) -> list[str]:
    """The accepted models no live worker serves."""
    served = {w.model for w in workers if w.live}
    return [m for m in models if m not in served]
