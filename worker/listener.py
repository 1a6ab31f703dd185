"""Listens for batch cancellations so running requests are aborted in the engine."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from sluice.queue import CANCEL_CHANNEL

log = logging.getLogger("sluice.worker")


class CancelListener:
    """Subscribes to the cancel channel; the reconciler catches anything missed."""

    def __init__(self, client: redis.Redis, on_cancel: Callable[[str], None]) -> None:
        self.client = client
        self.on_cancel = on_cancel
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-cancel", daemon=True)

    def start(self) -> None:
        """Subscribe and listen in the background."""
        self._pubsub.subscribe(CANCEL_CHANNEL)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=1.0)
            except redis.RedisError:
                log.warning("cancel channel lost; the reconciler covers cancellations")
                self._stop.wait(1.0)
                continue
            if msg and msg.get("type") == "message":
                data = msg["data"]
                self.on_cancel(data.decode() if isinstance(data, bytes) else str(data))
