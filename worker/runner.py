"""The runner: claim -> engine -> write, on three threads, keeping the engine full.

Celery task threads hand request ids to `submit()` and wait on a Ticket. The claimer leases
rows in the database while fewer than `inflight_target` are in flight (about 2x the engine's
slots): the model's queued interactive rows first, then the ids messages named, else any
queued rows of the model. The engine thread only adds and steps, and the writer commits
results in bulk. A ticket completes when every id it named is committed by this worker or was
not claimable (finished already, or leased by another worker), so the message is acked after
the commit.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import OperationalError

from sluice.config import Settings
from sluice.db import Database
from sluice.errors import RequestRejected
from sluice.ids import now
from sluice.models import BULK, INTERACTIVE
from sluice.store import work
from sluice.store.work import Claimed, Result
from worker.engines.base import Engine, GenRequest, GenResult
from worker.prepare import rejected_result, to_gen_request

log = logging.getLogger("sluice.worker")
T = TypeVar("T")
P = ParamSpec("P")


@dataclass
class Ticket:
    """The ids of one message; `done` is set once all of them are settled."""

    remaining: set[int]
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every id is settled (True) or the timeout passes (False)."""
        return self.done.wait(timeout)


@dataclass
class Abort:
    """Engine-thread instruction: drop these requests."""

    ids: list[int]


class Runner:
    """Feeds one engine from the database, continuously or (for comparison) chunk by chunk."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        engine: Engine,
        owner: str,
        on_finished: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.engine = engine
        self.owner = owner
        self.on_finished = on_finished or (lambda _ids: None)
        self.target = max(1, int(engine.slots * settings.inflight_factor))
        self.batch_mode = settings.feed_mode == "batch"
        self._cv = threading.Condition()
        self._pending: list[tuple[int, int, int]] = []  # (priority, seq, id)
        self._queued_ids: set[int] = set()
        self._seq = itertools.count()
        self._tickets: dict[int, list[Ticket]] = {}
        self._inflight: dict[int, str] = {}  # request id -> batch id
        # Items travel in lists (one claim, one engine step): a queue operation per request
        # costs more than the echo engine's whole work.
        self._inbox: queue.Queue[list[GenRequest] | Abort | None] = queue.Queue()
        self._results: queue.Queue[list[Result] | None] = queue.Queue()
        self._preparing = False  # the claimer is handing a claimed chunk to the engine
        self._next_poll = 0.0  # when the claimer next looks for unnamed queued rows
        self._more_in_db = False  # the last look found a full claim: look again at once
        self._steal_after = 0  # bulk rows below this id were looked at already
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.completed = 0

    # -- called by Celery task threads ------------------------------------------------
    def submit(self, ids: Iterable[int], priority: int) -> Ticket:
        """Queue request ids for claiming; the ticket completes when all are settled."""
        ticket = Ticket(set(ids))
        with self._cv:
            for rid in ticket.remaining:
                self._tickets.setdefault(rid, []).append(ticket)
                if rid not in self._queued_ids and rid not in self._inflight:
                    self._queued_ids.add(rid)
                    heapq.heappush(self._pending, (priority, next(self._seq), rid))
            if not ticket.remaining:
                ticket.done.set()
            self._cv.notify_all()
        return ticket

    def inflight_ids(self) -> dict[int, str]:
        """Requests claimed and not yet written (id -> batch id)."""
        with self._cv:
            return dict(self._inflight)

    def abort_batch(self, batch_id: str) -> None:
        """Abort this batch's requests that are in the engine (its queued ones are cancelled)."""
        self.abort([rid for rid, bid in self.inflight_ids().items() if bid == batch_id])

    def abort(self, ids: list[int]) -> None:
        """Abort these in-flight requests."""
        if ids:
            self._inbox.put(Abort(ids))

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the claimer, engine and writer threads."""
        for name, target in (
            ("claimer", self._claim_loop),
            ("engine", self._engine_loop),
            ("writer", self._write_loop),
        ):
            t = threading.Thread(target=self._guard(target), name=f"sluice-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after what is in flight is written."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._inbox.put(None)
        for t in self._threads:
            if t.name != "sluice-writer":
                t.join(timeout)
        self._results.put(None)
        for t in self._threads:
            t.join(timeout)

    def _guard(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except Exception:
                # A dead thread would leave messages unacked forever: stop loudly instead.
                log.exception("runner thread crashed; stopping the worker")
                self._stop.set()
                os.kill(os.getpid(), signal.SIGTERM)

        return run

    # -- claimer ------------------------------------------------------------------------
    def _room(self) -> int:
        """How many more requests to claim now (caller holds the lock)."""
        busy = len(self._inflight)
        if self.batch_mode:
            return self.engine.slots if busy == 0 else 0
        # At most one engine-full per claim: the next claim then overlaps the writer's commit.
        return min(self.target - busy, self.engine.slots)

    def _wait_for_room(self) -> int:
        """Block until there is room and named ids wait or the database is due a look."""
        with self._cv:
            while not self._stop.is_set():
                room = self._room()
                if room > 0 and (self._pending or self._poll_due()):
                    self._preparing = True
                    return room
                timeout = max(0.0, self._next_poll - time.monotonic()) if room > 0 else None
                self._cv.wait(timeout)
        return 0

    def _poll_due(self) -> bool:
        return self._more_in_db or time.monotonic() >= self._next_poll

    def _pop_pending(self, room: int) -> list[int]:
        """Next named ids, interactive first (caller holds the lock)."""
        ids: list[int] = []
        while self._pending and len(ids) < room:
            _, _, rid = heapq.heappop(self._pending)
            self._queued_ids.discard(rid)
            if rid not in self._inflight:  # else claimed from the database; settles on write
                ids.append(rid)
        for rid in ids:
            self._inflight[rid] = ""
        return ids

    def _hold(self, claimed: list[Claimed]) -> None:
        with self._cv:
            for c in claimed:
                self._inflight[c.id] = c.batch_id

    def _claim_loop(self) -> None:
        while not self._stop.is_set():
            room = self._wait_for_room()
            if room <= 0:
                continue
            try:
                self._prepare(self._claim_round(room))
            finally:
                with self._cv:
                    self._preparing = False
                    self._cv.notify_all()

    def _claim_round(self, room: int) -> list[Claimed]:
        """One claim: queued interactive rows, then the ids messages named, else any rows."""
        s, model = self.settings, self.settings.served_model
        # Interactive rows come straight from the database: their message may still wait
        # behind the bulk messages this worker holds.
        claimed = _retry(
            work.claim_next, self.db, model, self.owner, s.lease_seconds, room, INTERACTIVE
        )
        self._hold(claimed)
        room -= len(claimed)
        with self._cv:
            ids = self._pop_pending(room)
        if ids:
            named = _retry(work.claim, self.db, ids, self.owner, s.lease_seconds)
            got = {c.id for c in named}
            with self._cv:
                for c in named:
                    self._inflight[c.id] = c.batch_id
                for rid in ids:
                    if rid not in got:
                        del self._inflight[rid]
                self._settle(rid for rid in ids if rid not in got)
            claimed += named
        elif room > 0 and self._poll_due():
            # Nothing named here: take this model's queued rows whoever holds their message
            # (another worker's backlog, a lost message, a worker that just joined).
            taken = _retry(
                work.claim_next,
                self.db,
                model,
                self.owner,
                s.lease_seconds,
                room,
                BULK,
                self._steal_after,
            )
            self._more_in_db = len(taken) == room
            # Continue after the last row taken; start over once the queue looks drained.
            self._steal_after = max(c.id for c in taken) if self._more_in_db else 0
            self._next_poll = time.monotonic() + s.idle_poll
            self._hold(taken)
            claimed += taken
        return claimed

    def _prepare(self, claimed: list[Claimed]) -> None:
        """Validate and render; rejected requests go straight to the writer."""
        ready: list[GenRequest] = []
        rejected: list[Result] = []
        for c in claimed:
            try:
                ready.append(to_gen_request(c, self.engine))
            except RequestRejected as exc:
                rejected.append(rejected_result(c.id, exc))
        if ready:
            self._inbox.put(ready)
        if rejected:
            self._results.put(rejected)

    # -- engine thread -------------------------------------------------------------------
    def _engine_loop(self) -> None:
        engine = self.engine
        stopping = False
        while True:
            if not engine.has_unfinished():
                if stopping:
                    return
                # Idle: block until the claimer hands over work.
                stopping = self._admit(self._inbox.get()) or stopping
            # Admit everything waiting before the next step: new work joins the running batch.
            stopping = self._drain_inbox() or stopping
            if not self.batch_mode:
                if engine.has_unfinished():
                    self._emit(engine.step())
            elif stopping or self._inbox_idle():
                # The naive design: generate the whole chunk, wait for it, then take more.
                while engine.has_unfinished():
                    self._emit(engine.step())
            else:
                # Batch mode, chunk still arriving: wait for its next request.
                with contextlib.suppress(queue.Empty):
                    stopping = self._admit(self._inbox.get(timeout=0.05)) or stopping

    def _drain_inbox(self) -> bool:
        """Admit what is waiting without blocking; True if a stop arrived."""
        stopping = False
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return stopping
            stopping = self._admit(item) or stopping

    def _inbox_idle(self) -> bool:
        """Batch mode: the claimer has handed over its whole chunk."""
        with self._cv:
            return self._inbox.empty() and not self._preparing

    def _admit(self, item: list[GenRequest] | Abort | None) -> bool:
        """Hand an item to the engine; True when it is the stop signal."""
        if item is None:
            return self._stop.is_set()
        if isinstance(item, Abort):
            self.engine.abort(item.ids)
        else:
            for request in item:
                self.engine.add(request)
        return False

    def _emit(self, outs: list[GenResult]) -> None:
        if outs:
            t = now()
            self._results.put([to_result(o, t) for o in outs])

    # -- writer ---------------------------------------------------------------------------
    def _write_loop(self) -> None:
        limit = self.settings.write_batch_max
        while True:
            first = self._results.get()
            if first is None:
                return
            batch = list(first)
            while len(batch) < limit:
                try:
                    nxt = self._results.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._results.put(None)
                    break
                batch.extend(nxt)
            finished = _retry(work.write_results, self.db, self.owner, batch)
            with self._cv:
                for r in batch:
                    self._inflight.pop(r.id, None)
                self._settle(r.id for r in batch)
                self.completed += len(batch)
                self._cv.notify_all()
            if finished:
                self.on_finished(finished)

    def _settle(self, ids: Iterable[int]) -> None:
        """Mark ids settled for every ticket naming them (caller holds the lock)."""
        for rid in ids:
            for ticket in self._tickets.pop(rid, ()):
                ticket.remaining.discard(rid)
                if not ticket.remaining:
                    ticket.done.set()


def to_result(out: GenResult, finished_at: float) -> Result:
    """The stored form of an engine result."""
    # PostgreSQL text cannot hold NUL; a model that emits one must not fail its whole write.
    text = out.text.replace("\x00", "") if "\x00" in out.text else out.text
    if out.finish_reason == "abort":
        return Result(out.id, "cancelled", text, "abort", "batch_cancelled",
                      "the batch was cancelled while this request ran", out.prompt_tokens,
                      out.completion_tokens, finished_at)  # fmt: skip
    if out.error:
        return Result(out.id, "failed", None, None, "engine_error", out.error,
                      out.prompt_tokens, out.completion_tokens, finished_at)  # fmt: skip
    return Result(out.id, "succeeded", text, out.finish_reason, None, None,
                  out.prompt_tokens, out.completion_tokens, finished_at)  # fmt: skip


def _retry(call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Retry a database call through brief outages (a restart, a failover)."""
    attempts = 5
    for i in range(attempts):
        try:
            return call(*args, **kwargs)
        except OperationalError:
            if i == attempts - 1:
                raise
            log.warning("database error; retrying", exc_info=True)
            time.sleep(min(2.0**i * 0.2, 5.0))
    raise AssertionError("unreachable")
