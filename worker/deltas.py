"""Streaming requests' text, from the engine thread to a Redis Stream per request.

The engine thread hands deltas over without waiting (a bounded queue: when Redis is slow the
queue fills and pieces are dropped, never the engine stalled; the API notices the gap by its
offset and sends the rest from the database). A thread of its own writes to Redis, pipelined.
The writer marks each request's end after its result is committed (sluice/deltas.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
import redis

from sluice.deltas import STREAM_MAXLEN, STREAM_TTL_SECONDS, stream_key
from sluice.store.work import Claimed, storable_text
from worker.engines.base import Delta, GenRequest

log = logging.getLogger("sluice.worker")

# Pieces waiting for Redis: about 16 s of 64 streams at 60 tokens/s; beyond, pieces drop.
QUEUE_MAX = 65_536
# Entries per pipelined round trip.
BATCH = 512

_Piece = tuple[str, int, int, str]  # stream key, attempt, offset, text
_End = tuple[str, int]  # stream key, attempt


@dataclass
class _Live:
    """A streaming request in the engine: its stream, attempt and characters so far."""

    key: str
    attempt: int
    sent: int = 0


class DeltaPublisher:
    """Publishes streaming requests' pieces and ends; thread-safe, never blocks its callers."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}  # by request id
        self._queue: queue.Queue[list[_Piece | _End] | None] = queue.Queue(QUEUE_MAX)
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="sluice-deltas", daemon=True)

    def start(self) -> None:
        """Start the Redis writer thread."""
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(5)

    def track(self, job_id: str, request_id: int, attempt: int) -> None:
        """A streaming request enters the engine (claimer thread): its text starts at 0."""
        with self._lock:
            self._live[request_id] = _Live(stream_key(job_id, request_id), attempt)

    def put(self, deltas: list[Delta]) -> None:
        """Queue pieces (engine thread); offsets count every piece, sent or dropped."""
        items: list[_Piece | _End] = []
        with self._lock:
            for d in deltas:
                live = self._live.get(d.id)
                if live is None:
                    continue
                text = storable_text(d.text)  # exactly what the stored answer will hold
                items.append((live.key, live.attempt, live.sent, text))
                live.sent += len(text)
        self._offer(items)

    def finished(self, ids: Iterable[int]) -> None:
        """These requests' results are committed (writer thread): mark their ends."""
        items: list[_Piece | _End] = []
        with self._lock:
            for rid in ids:
                live = self._live.pop(rid, None)
                if live is not None:
                    items.append((live.key, live.attempt))
        self._offer(items)

    def forget(self, ids: Iterable[int]) -> None:
        """Released without a result (they run again elsewhere, as a new attempt)."""
        with self._lock:
            for rid in ids:
                self._live.pop(rid, None)

    def _offer(self, items: list[_Piece | _End]) -> None:
        if not items:
            return
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            # The API fills the gap from the database (and learns the end from its notice).
            self.dropped += len(items)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items = list(first)
            while len(items) < BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                items.extend(more)
            try:
                self._write(items)
            except redis.RedisError:
                self.dropped += len(items)
                log.warning("could not write %d stream pieces", len(items), exc_info=True)

    def _write(self, items: list[_Piece | _End]) -> None:
        pipe = self.client.pipeline(transaction=False)
        keys: set[str] = set()
        for item in items:
            key = item[0]
            keys.add(key)
            if len(item) == 4:
                _, attempt, offset, text = item
                fields = {"a": attempt, "o": offset, "t": text}
            else:
                fields = {"a": item[1], "e": 1}
            pipe.xadd(key, fields, maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        for key in keys:
            pipe.expire(key, STREAM_TTL_SECONDS)
        pipe.execute()


def mark_streams(claimed: Iterable[Claimed], ready: list[GenRequest], sink: DeltaPublisher) -> None:
    """Flag the online requests that asked for stream=true and start tracking them."""
    # The substring test skips parsing every bulk body; only a candidate is parsed.
    wanted = {
        c.id: c
        for c in claimed
        if not c.from_file and '"stream": true' in c.body and orjson.loads(c.body).get("stream")
    }
    if not wanted:
        return
    for request in ready:
        found = wanted.get(request.id)
        if found is not None:
            request.stream = True
            sink.track(found.batch_id, request.id, found.attempts)
