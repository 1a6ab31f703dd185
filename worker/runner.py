"""The runner: claim -> engine -> write, on three threads, keeping the engine full.

Celery tasks hand request ids to `submit()` and return (messages are only wake-ups; the
rows wait, queued, in the database). `submit()` returns a Ticket that in-process callers
(tests, benchmarks) may wait on. The claimer leases
rows in the database while fewer than `inflight_target` are in flight (about 2x the engine's
slots): the model's queued interactive rows first, then the ids messages named, else any
queued rows of the model. The engine thread only adds and steps, and the writer commits
results in bulk. A ticket completes when every id it named is committed by this worker or was
not claimable (finished already, or leased by another worker).

Never hang: a runner thread that dies, or an engine step that stalls past
`engine_stall_seconds`, fails the runner: its rows go back to the queue (those in the engine
charged one crash, the rest not), the engine's processes are closed and the process exits
non-zero within EXIT_DEADLINE seconds. `drain()` is the graceful path (SIGTERM): claiming stops,
claimed rows that never reached the engine are released at once, the engine gets
`shutdown_grace` seconds, and whatever is still in it is aborted and released.

Suspects (rows that were in an engine when it crashed) run in isolation groups, one group at a
time beside ordinary work, 8x smaller after each crash; one crash before max_attempts they run
alone, with nothing else in the engine, so the request that crashes the engine is found and
fails by itself.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import orjson
from sqlalchemy.exc import InterfaceError, OperationalError

from sluice.config import Settings
from sluice.db import Database
from sluice.ids import now
from sluice.models import BULK, INTERACTIVE
from sluice.store import work
from sluice.store.work import Claimed, Result
from worker.deltas import DeltaPublisher, mark_streams
from worker.engines.base import Engine, GenRequest, GenResult
from worker.faults import Faults
from worker.metrics import RunnerMetrics
from worker.prepare import prepare

log = logging.getLogger("sluice.worker")
T = TypeVar("T")
P = ParamSpec("P")

# Exit codes: a failed runner (supervisors restart on non-zero), a shutdown past its deadline.
EXIT_RUNNER_FAILED = 70
EXIT_SHUTDOWN_OVERRUN = 75
# A failing runner releases its rows and closes the engine within this; then it exits anyway.
EXIT_DEADLINE = 20.0
# After the grace, aborting, releasing and exiting take at most this long.
SHUTDOWN_MARGIN = 8.0
# Claimed beyond the in-flight target when an interactive message waits (see _room).
INTERACTIVE_ROOM = 4
# While the engine holds a full batch, bulk is claimed in chunks of at least this share of its
# slots. Claims were 12% of the worker's CPU in the 10,000-request plumbing benchmark, much of
# it per transaction (BEGIN, statement, COMMIT) when every step's handful of finished requests
# was refilled at once. With 2 slots' worth in flight, waiting for a quarter still leaves 1.75
# slots' worth claimed: the engine never waits for it.
MIN_CLAIM_SHARE = 0.25
# An isolation group is this many times smaller after each crash (512 in flight: 64, 8, 1).
ISOLATION_SHRINK = 8


@dataclass
class Ticket:
    """The ids of one message; `done` is set once all of them are settled."""

    remaining: set[int]
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every id is settled (True) or the timeout passes (False)."""
        return self.done.wait(timeout)


class RunnerFailed(RuntimeError):
    """The runner failed; the process is exiting (its rows are being released)."""


@dataclass
class Abort:
    """Engine-thread instruction: drop these requests."""

    ids: list[int]


@dataclass
class Drain:
    """Engine-thread instruction: admit nothing more; abort what remains at the deadline."""

    deadline: float


@dataclass
class Release:
    """Writer instruction: give these claimed rows back to the queue, uncharged."""

    ids: list[int]


CLAIMER_DONE = "claimer-done"


class Runner:
    """Feeds one engine from the database, continuously or (for comparison) chunk by chunk."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        engine: Engine,
        owner: str,
        on_finished: Callable[[list[str]], None] | None = None,
        faults: Faults | None = None,
        deltas: DeltaPublisher | None = None,
    ) -> None:
        self.settings = settings
        # Streaming requests' text goes out through this (worker/deltas.py); None: no streams.
        self.deltas = deltas
        self.db = db
        self.faults = faults or Faults()
        self.engine = self.faults.wrap(engine)
        self.owner = owner
        self.on_finished = on_finished or (lambda _ids: None)
        self.target = max(1, int(engine.slots * settings.inflight_factor))
        self._min_claim = max(1, int(engine.slots * MIN_CLAIM_SHARE))
        self.batch_mode = settings.feed_mode == "batch"
        self._cv = threading.Condition()
        self._pending: list[tuple[int, int, int]] = []  # (priority, seq, id)
        self._queued_ids: set[int] = set()
        self._seq = itertools.count()
        self._tickets: dict[int, list[Ticket]] = {}
        self._inflight: dict[int, str] = {}  # request id -> batch id
        # Items travel in lists (one claim, one engine step): a queue operation per request
        # costs more than the echo engine's whole work.
        self._inbox: queue.Queue[list[GenRequest] | Abort | Drain | str | None] = queue.Queue()
        self._results: queue.Queue[list[Result] | Release | None] = queue.Queue()
        self._preparing = False  # the claimer is handing a claimed chunk to the engine
        self._next_poll = 0.0  # when the claimer next looks for unnamed queued rows
        self._more_in_db = False  # the last look found a full claim: look again at once
        self._steal_after = 0  # bulk rows below this id were looked at already
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.completed = 0
        self.failure: str | None = None  # why the runner failed; the process is exiting
        self._draining = False
        self._in_engine: set[int] = set()  # handed to the engine, not yet returned by it
        self._drained: set[int] = set()  # aborted by a drain: released, not cancelled
        self._step_started: float | None = None  # when the running engine step began
        self._suspects = 0  # crash level of the suspects being isolated (0: none)
        self._group: set[int] = set()  # the isolation group in flight
        self._next_suspect_check = 0.0
        self._drain_deadline: float | None = None  # engine thread: set by a Drain
        self._claimer_done = False  # engine thread: the claimer has stopped
        self._overrun_timer: threading.Timer | None = None
        # Prometheus: one call per claim and per written batch (worker/metrics.py).
        self.metrics = RunnerMetrics(settings.served_model)

    # -- called by Celery task threads ------------------------------------------------
    def submit(self, ids: Iterable[int], priority: int) -> Ticket:
        """Queue request ids for claiming; the ticket completes when all are settled."""
        ticket = Ticket(set(ids))
        with self._cv:
            if self._draining or self.failure:
                # Their rows stay queued in the database for the next worker to claim.
                ticket.remaining.clear()
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

    def writer_backlog(self) -> int:
        """Result groups waiting for the writer (a metrics gauge; approximate by nature)."""
        return self._results.qsize()

    def abort_batch(self, batch_id: str) -> None:
        """Abort this batch's requests that are in the engine (its queued ones are cancelled)."""
        self.abort([rid for rid, bid in self.inflight_ids().items() if bid == batch_id])

    def abort(self, ids: list[int]) -> None:
        """Abort these in-flight requests."""
        if ids:
            self._inbox.put(Abort(ids))

    def progressing(self) -> bool:
        """True while the runner is healthy and no engine step has stalled (lease renewal)."""
        return self.failure is None and self._step_age() <= self.settings.engine_stall_seconds

    def _step_age(self) -> float:
        """Seconds the running engine step has taken so far (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the claimer, engine and writer threads, and their watchdog."""
        for name, target in (
            ("claimer", self._claim_loop),
            ("engine", self._engine_loop),
            ("writer", self._write_loop),
        ):
            t = threading.Thread(
                target=self._guard(name, target), name=f"sluice-{name}", daemon=True
            )
            t.start()
            self._threads.append(t)
        threading.Thread(target=self._watch, name="sluice-watchdog", daemon=True).start()

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
        if self._overrun_timer is not None:
            self._overrun_timer.cancel()

    def drain(self, grace: float) -> None:
        """Graceful shutdown, without blocking: stop claiming, release what never reached the
        engine, give the engine `grace` seconds, then abort and release the rest."""
        with self._cv:
            if self._draining or self.failure:
                return
            self._draining = True
            # Named but never claimed: the rows stay queued; their messages can be acked.
            unclaimed = [rid for _, _, rid in self._pending]
            self._pending.clear()
            self._queued_ids.clear()
            for rid in unclaimed:
                self._inflight.pop(rid, None)
            self._settle(unclaimed)
            self._cv.notify_all()
        log.info("draining: %d requests held, %.0fs grace", len(self._inflight), grace)
        self._inbox.put(Drain(time.monotonic() + grace))
        self._overrun_timer = threading.Timer(grace + SHUTDOWN_MARGIN, self._overrun)
        self._overrun_timer.daemon = True
        self._overrun_timer.start()

    def _overrun(self) -> None:
        """The drain missed its deadline: release everything held and exit."""
        log.error("shutdown took longer than its grace; releasing held requests and exiting")
        self._release_and_exit(set(), EXIT_SHUTDOWN_OVERRUN)

    def _guard(self, name: str, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as exc:
                log.exception("runner thread %s crashed", name)
                self.fail(f"the {name} thread crashed: {exc!r}", engine_fault=name == "engine")

        return run

    def _watch(self) -> None:
        """Fail the runner when a thread is gone, an engine step has stalled or the engine
        died (an idle engine's death would otherwise wait for the next request's step)."""
        while not self._stop.wait(1.0):
            stalled = self._step_age()
            if stalled > self.settings.engine_stall_seconds:
                self.fail(f"an engine step has not returned in {stalled:.0f}s", True)
                return
            died = self.engine.dead()
            if died is not None:
                self.fail(died, engine_fault=True)
                return
            for t in self._threads:
                # Threads end on their own only when stopping or draining.
                if not t.is_alive() and not self._stop.is_set() and not self._draining:
                    self.fail(f"runner thread {t.name} is gone", engine_fault=False)
                    return

    def fail(self, reason: str, engine_fault: bool) -> None:
        """Give up: settle every ticket, release the rows, close the engine, exit non-zero."""
        with self._cv:
            if self.failure:
                return
            self.failure = reason
            self._stop.set()
            for tickets in self._tickets.values():
                for ticket in tickets:
                    ticket.done.set()
            self._tickets.clear()
            self._cv.notify_all()
        log.error("runner failed (%s); releasing requests and exiting", reason)
        # Only an engine failure charges the requests that were in it; a crash of the claimer
        # or the writer says nothing about them.
        suspects = set(self._in_engine) if engine_fault else set()
        threading.Thread(
            target=self._release_and_exit,
            args=(suspects, EXIT_RUNNER_FAILED),
            name="sluice-exit",
            daemon=True,
        ).start()

    def _release_and_exit(self, suspects: set[int], code: int) -> None:
        """Release held rows and close the engine, bounded by EXIT_DEADLINE; then exit."""
        deadline = threading.Timer(EXIT_DEADLINE, os._exit, (code,))
        deadline.daemon = True
        deadline.start()
        held = list(self.inflight_ids())
        max_attempts = self.settings.max_attempts
        try:
            charged = [rid for rid in held if rid in suspects]
            innocent = [rid for rid in held if rid not in suspects]
            work.release(self.db, self.owner, charged, max_attempts, charge=True)
            work.release(self.db, self.owner, innocent, max_attempts, charge=False)
            log.info("released %d requests (%d charged a crash)", len(held), len(charged))
        except Exception:
            log.exception("could not release held requests; their leases will expire")
        try:
            self.engine.close()
        except Exception:
            log.exception("closing the engine failed")
        logging.shutdown()
        os._exit(code)

    # -- claimer ------------------------------------------------------------------------
    def _room(self) -> int:
        """How many more requests to claim now (caller holds the lock)."""
        busy = len(self._inflight)
        if self._suspects and self._alone(self._suspects):
            # The last step of isolation: one suspect with nothing else in the engine.
            return 1 if busy == 0 else 0
        if self.batch_mode:
            return self.engine.slots if busy == 0 else 0
        # At most one engine-full per claim: the next claim then overlaps the writer's commit.
        room = min(self.target - busy, self.engine.slots)
        interactive_waits = bool(self._pending) and self._pending[0][0] == INTERACTIVE
        if room < self._min_claim and busy >= self.engine.slots and not interactive_waits:
            room = 0
        if room <= 0 and interactive_waits:
            # An online request or job does not wait for a write to free room behind the bulk
            # in flight (room frees only as sequences finish); the engine admits it first.
            # Bounded: at most one engine-full over the target.
            return INTERACTIVE_ROOM if busy < self.target + self.engine.slots else 0
        return room

    def _wait_for_room(self) -> int:
        """Block until there is room and named ids wait or the database is due a look."""
        with self._cv:
            while not self._stop.is_set() and not self._draining:
                room = self._room()
                group_due = self._suspects and not self._group
                if room > 0 and (group_due or self._pending or self._poll_due()):
                    self._preparing = True
                    return room
                timeout = max(0.0, self._next_poll - time.monotonic()) if room > 0 else None
                self._cv.wait(timeout)
        return 0

    def _poll_due(self) -> bool:
        return self._more_in_db or time.monotonic() >= self._next_poll

    def _alone(self, level: int) -> bool:
        """Suspects one crash short of the limit run alone: a crash then names its cause."""
        return level >= self.settings.max_attempts - 1

    def _group_size(self, level: int) -> int:
        """Isolation group size for suspects with `level` crashes (8x smaller per crash)."""
        return max(1, self.target // int(ISOLATION_SHRINK**level))

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
        try:
            while not self._stop.is_set() and not self._draining:
                room = self._wait_for_room()
                if room <= 0:
                    continue
                self.faults.turn("claimer")
                try:
                    self._prepare(self._claim_round(room))
                finally:
                    with self._cv:
                        self._preparing = False
                        self._cv.notify_all()
        finally:
            self._inbox.put(CLAIMER_DONE)

    def _claim_round(self, room: int) -> list[Claimed]:
        """One claim: queued interactive rows, then the ids messages named, else any rows."""
        s, model = self.settings, self.settings.served_model
        if not self._suspects and time.monotonic() >= self._next_suspect_check:
            # Suspects: rows that were in an engine when it crashed.
            self._next_suspect_check = time.monotonic() + s.idle_poll
            self._suspects = self._db(work.suspect_level, self.db, model)
        if self._suspects and self._alone(self._suspects):
            # Alone: claim nothing else, and only once the engine has emptied.
            with self._cv:
                empty = not self._inflight
            return self._claim_suspects(1) if empty else []
        claimed: list[Claimed] = []
        if self._suspects and not self._group:
            # One isolation group at a time, beside ordinary work: if it crashes the engine
            # its members move a level up (smaller groups, then alone); ordinary work that
            # was in the engine becomes a first-level suspect, never more.
            claimed = self._claim_suspects(min(room, self._group_size(self._suspects)))
            room -= len(claimed)
            if room <= 0 or (self._suspects and self._alone(self._suspects)):
                return claimed
        # Interactive rows come straight from the database: their message may still wait
        # behind the bulk messages this worker holds.
        interactive = self._db(
            work.claim_next, self.db, model, self.owner, s.lease_seconds, room, INTERACTIVE
        )
        self._hold(interactive)
        claimed += interactive
        room -= len(interactive)
        if interactive:
            # To the engine at once: the bulk claim below may wait for the writer's commit
            # (SQLite has one writer), and interactive rows would wait with it.
            return claimed
        with self._cv:
            ids = self._pop_pending(room)
        if ids:
            named = self._db(work.claim, self.db, ids, self.owner, s.lease_seconds)
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
            taken = self._db(
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

    def _claim_suspects(self, room: int) -> list[Claimed]:
        """Claim the next isolation group; leave isolation when no suspect is left."""
        s = self.settings
        claimed = self._db(
            work.claim_suspects, self.db, s.served_model, self.owner, s.lease_seconds, room,
            self._suspects,
        )  # fmt: skip
        if claimed:
            log.warning(
                "isolating %d suspect request(s) (%d crash(es) each)", len(claimed), self._suspects
            )
            self._hold(claimed)
            with self._cv:
                self._group = {c.id for c in claimed}
        else:
            level = self._db(work.suspect_level, self.db, s.served_model)
            # Nothing claimable at this level: none left, or another worker holds them. Only
            # a new level is taken at once; otherwise look again after the idle poll, not in
            # a tight loop.
            self._suspects = level if level != self._suspects else 0
            self._next_suspect_check = time.monotonic() + s.idle_poll
        return claimed

    def _prepare(self, claimed: list[Claimed]) -> None:
        """Validate and render; rejected requests go straight to the writer."""
        self.metrics.claimed(claimed)
        ready, rejected = prepare(claimed, self.engine)
        if self.deltas is not None:
            mark_streams(claimed, ready, self.deltas)
        if ready:
            self._inbox.put(ready)
        if rejected:
            self._results.put(rejected)

    # -- engine thread -------------------------------------------------------------------
    def _engine_loop(self) -> None:
        engine = self.engine
        stopping = False
        while True:
            self.faults.turn("engine")
            if not engine.has_unfinished():
                if stopping or (self._drain_deadline is not None and self._claimer_done):
                    self._release_unadmitted()
                    return
                # Idle: block until the claimer hands over work.
                stopping = self._admit(self._inbox.get()) or stopping
            # Admit everything waiting before the next step: new work joins the running batch.
            stopping = self._drain_inbox() or stopping
            if self._drain_due():
                self._abort_for_drain()
            if not self.batch_mode:
                if engine.has_unfinished():
                    self._step()
            elif stopping or self._drain_deadline is not None or self._inbox_idle():
                # The naive design: generate the whole chunk, wait for it, then take more.
                while engine.has_unfinished():
                    self._step()
                    if (
                        self._drain_deadline is not None
                        and time.monotonic() >= self._drain_deadline
                    ):
                        self._abort_for_drain()
            else:
                # Batch mode, chunk still arriving: wait for its next request.
                with contextlib.suppress(queue.Empty):
                    stopping = self._admit(self._inbox.get(timeout=0.05)) or stopping

    def _release_unadmitted(self) -> None:
        """On the way out: claimed work still in the inbox goes back to the queue."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, list):
                self._results.put(Release([r.id for r in item]))

    def _drain_due(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() >= self._drain_deadline

    def _step(self) -> None:
        """One engine step, timed for the stall watchdog."""
        self._step_started = time.monotonic()
        outs = self.engine.step()
        self._step_started = None
        if self.deltas is not None:
            # Before _emit: a request's last pieces are queued ahead of its result.
            self.deltas.put(self.engine.take_deltas())
        self._emit(outs)

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

    def _admit(self, item: list[GenRequest] | Abort | Drain | str | None) -> bool:
        """Hand an item to the engine; True when it is the stop signal."""
        if item is None:
            return self._stop.is_set()
        if isinstance(item, Abort):
            self.engine.abort(item.ids)
        elif isinstance(item, Drain):
            self._drain_deadline = item.deadline
        elif isinstance(item, str):
            self._claimer_done = item == CLAIMER_DONE
        elif self._drain_deadline is not None:
            # Claimed but never started: straight back to the queue.
            self._results.put(Release([r.id for r in item]))
        else:
            for request in item:
                # Counted in before add(): a request whose add() kills the engine is a suspect.
                self._in_engine.add(request.id)
                self.engine.add(request)
        return False

    def _abort_for_drain(self) -> None:
        """The grace is over: abort what is still in the engine (released, not cancelled)."""
        left = self._in_engine - self._drained
        if left:
            log.info("grace over: %d requests go back to the queue", len(left))
            self._drained |= left
            self.engine.abort(sorted(left))

    def _emit(self, outs: list[GenResult]) -> None:
        if not outs:
            return
        t = now()
        results: list[Result] = []
        released: list[int] = []
        for o in outs:
            self._in_engine.discard(o.id)
            if o.id in self._drained:
                released.append(o.id)
            else:
                results.append(to_result(o, t))
        if results:
            self._results.put(results)
        if released:
            self._results.put(Release(released))

    # -- writer ---------------------------------------------------------------------------
    def _write_loop(self) -> None:
        limit = self.settings.write_batch_max
        while True:
            first = self._results.get()
            if first is None:
                return
            self.faults.turn("writer")
            releases = [first] if isinstance(first, Release) else []
            batch = [] if isinstance(first, Release) else list(first)
            while len(batch) < limit:
                try:
                    nxt = self._results.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._results.put(None)
                    break
                if isinstance(nxt, Release):
                    releases.append(nxt)
                else:
                    batch.extend(nxt)
            if batch:
                finished = self._db(work.write_results, self.db, self.owner, batch)
                self.metrics.written(batch)
                if self.deltas is not None:
                    self.deltas.finished(r.id for r in batch)  # committed: streams may end
                self._done_with([r.id for r in batch], written=True)
                self._announce(finished)
            for rel in releases:
                max_attempts = self.settings.max_attempts
                self._db(work.release, self.db, self.owner, rel.ids, max_attempts, charge=False)
                if self.deltas is not None:
                    self.deltas.forget(rel.ids)
                self.metrics.released(rel.ids)
                self._done_with(rel.ids, written=False)

    def _done_with(self, ids: list[int], written: bool) -> None:
        """These ids are no longer held: settle their tickets."""
        with self._cv:
            for rid in ids:
                self._inflight.pop(rid, None)
            self._group.difference_update(ids)
            self._settle(ids)
            if written:
                self.completed += len(ids)
            self._cv.notify_all()

    def _announce(self, finished: list[str]) -> None:
        """Tell listeners which batches finished; a failure here must not stop the writer."""
        if not finished:
            return
        try:
            self.on_finished(finished)
        except Exception:
            # Long-polls re-check the database on their own; a lost wake-up only delays them.
            log.warning("could not announce %d finished batches", len(finished), exc_info=True)

    def _db(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a database call, waiting out outages of any length (unless the runner failed)."""
        delay, warned = 0.2, 0.0
        while True:
            try:
                return call(*args, **kwargs)
            except (OperationalError, InterfaceError):
                if self.failure:
                    raise RunnerFailed(self.failure) from None
                if time.monotonic() - warned > 30:
                    log.warning("database unavailable; retrying until it is back", exc_info=True)
                    warned = time.monotonic()
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _settle(self, ids: Iterable[int]) -> None:
        """Mark ids settled for every ticket naming them (caller holds the lock)."""
        for rid in ids:
            for ticket in self._tickets.pop(rid, ()):
                ticket.remaining.discard(rid)
                if not ticket.remaining:
                    ticket.done.set()


def to_result(out: GenResult, finished_at: float) -> Result:
    """The stored form of an engine result."""
    text = work.storable_text(out.text)
    if out.finish_reason == "abort":
        return Result(out.id, "cancelled", text, "abort", "batch_cancelled",
                      "the batch was cancelled while this request ran", out.prompt_tokens,
                      out.completion_tokens, finished_at, out.cached_tokens)  # fmt: skip
    if out.error:
        return Result(out.id, "failed", None, None, out.error_code, out.error,
                      out.prompt_tokens, out.completion_tokens, finished_at,
                      out.cached_tokens)  # fmt: skip
    return Result(out.id, "succeeded", text, out.finish_reason, None, None,
                  out.prompt_tokens, out.completion_tokens, finished_at,
                  out.cached_tokens, choices_json(out))  # fmt: skip


def choices_json(out: GenResult) -> str | None:
    """Every choice of an n > 1 or logprobs result, as sluice.render reads it; else None.

    [{"text", "finish_reason", "completion_tokens",
      "logprobs": [[token, logprob, [[alternative, logprob], ...]], ...] or null}, ...]
    """
    if out.choices is None:
        return None
    return orjson.dumps(
        [
            {
                "text": work.storable_text(c.text),
                "finish_reason": c.finish_reason,
                "completion_tokens": c.completion_tokens,
                "logprobs": None
                if c.logprobs is None
                else [[t.token, t.logprob, t.top] for t in c.logprobs],
            }
            for c in out.choices
        ]
    ).decode()
