"""`sluice healthcheck worker`: is a worker on this host alive (a fresh stats document)?"""

from __future__ import annotations

import json
import socket
import time

from sluice.config import Settings
from sluice.queue import STATS_PREFIX
from sluice.redis_clients import sync_client


def worker_alive(settings: Settings, redis_url: str) -> str | None:
    """None when a worker on this host published stats lately; else why not."""
    # A worker's owner name starts with its host name (worker/main.py), unless
    # SLUICE_WORKER_ID names it: then that exact key.
    pattern = (
        f"{STATS_PREFIX}{settings.worker_id}"
        if settings.worker_id
        else f"{STATS_PREFIX}{socket.gethostname()}:*"
    )
    client = sync_client(redis_url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        docs = [json.loads(raw) for raw in client.mget(keys) if raw] if keys else []
    finally:
        client.close()
    fresh = [d for d in docs if time.time() - float(d.get("ts", 0)) < settings.worker_stale_seconds]
    if not docs:
        return "no worker on this host has published stats (still loading the model?)"
    if not fresh:
        return f"this host's worker stats are older than {settings.worker_stale_seconds:.0f}s"
    return None
