"""One pub/sub connection per API process wakes every long-poll (`GET /v1/jobs/{id}?wait=`).

A subscription per waiting client held one pooled Redis connection each: about 100 of them
exhausted the pool, and /readyz went 503. Here one pattern subscription hears every
"done" notice and wakes the waiters of that id; a waiter costs an Event, not a socket.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from redis.asyncio import Redis

from sluice.metrics import WAITING
from sluice.queue import DONE_CHANNEL

log = logging.getLogger("sluice.api")
RECONNECT_SECONDS = 1.0
PING_SECONDS = 5.0


class Waiter:
    """One long-poll's wake-up: an event that can be re-armed after each wake."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    def set(self) -> None:
        self.event.set()

    def rearm(self) -> bool:
        """Whether it was woken since the last rearm; either way, ready for the next wake."""
        woken = self.event.is_set()
        if woken:
            self.event = anyio.Event()
        return woken


class DoneListener:
    """Listens on sluice:done:* and sets the events of the jobs' waiters."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.healthy = False
        self._waiters: dict[str, set[Waiter]] = defaultdict(set)
        self.count = 0

    @contextmanager
    def waiting(self, job_id: str) -> Iterator[Waiter]:
        """A waiter woken when the job's done notice arrives (or when notices may be lost)."""
        event = Waiter()
        self._waiters[job_id].add(event)
        self.count += 1
        WAITING.inc()
        try:
            yield event
        finally:
            self.count -= 1
            WAITING.dec()
            events = self._waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job_id]

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        # Notices sent while we were not subscribed are lost: every waiter rereads.
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def run(self) -> None:
        """Subscribe, dispatch, and resubscribe after Redis errors, until cancelled."""
        prefix = f"{DONE_CHANNEL}:"
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(prefix + "*")
                self.healthy = True
                self._wake_all()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=PING_SECONDS
                    )
                    if message is None:
                        # Quiet: make sure the socket still leads to a live server.
                        await pubsub.ping()
                        continue
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode("utf-8", "replace")
                    self._wake(channel[len(prefix) :])
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                if self.healthy:
                    log.warning("long-poll listener lost Redis (%s); reconnecting", exc)
                self.healthy = False
                self._wake_all()
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await pubsub.aclose()
                    except Exception as exc:
                        log.debug("closing the listener's subscription failed: %s", exc)
            await anyio.sleep(RECONNECT_SECONDS)
