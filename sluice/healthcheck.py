"""`sluice healthcheck worker|webhooks`: is this host's worker (a fresh stats document) or
webhook sender (a fresh heartbeat file in the data directory) alive?"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

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


# The sender touches this file every loop (each webhook_poll seconds, or after each round of
# sends); a container's health check runs in the same container, so it sees the same file.
HEARTBEAT_FILE = "webhooks.alive"
# A loop waits at most webhook_poll between touches; an attempt is bounded by its timeout.
HEARTBEAT_SLACK = 30.0


def sender_heartbeat(settings: Settings) -> Path:
    """Where the webhook sender of this data directory marks itself alive."""
    return settings.data_dir / HEARTBEAT_FILE


def touch_sender_heartbeat(settings: Settings) -> None:
    """Mark the webhook sender alive now."""
    path = sender_heartbeat(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def sender_alive(settings: Settings) -> str | None:
    """None when this data directory's webhook sender looped lately; else why not."""
    try:
        age = time.time() - sender_heartbeat(settings).stat().st_mtime
    except FileNotFoundError:
        return "no webhook sender has started with this data directory"
    limit = settings.webhook_poll + HEARTBEAT_SLACK
    if age > limit:
        return f"the webhook sender last looped {age:.0f}s ago (limit {limit:.0f}s)"
    return None
