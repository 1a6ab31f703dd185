"""The reconciler: renews this worker's leases and repairs what crashes leave behind."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

import redis
from celery import Celery

from sluice.config import Settings
from sluice.db import Database
from sluice.queue import RECONCILE_LOCK, publish
from sluice.store import retention, work
from worker.runner import Runner

log = logging.getLogger("sluice.reconciler")


class Reconciler:
    """Every few seconds: renew leases; then, one worker at a time, requeue, expire, delete."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        app: Celery,
        client: redis.Redis,
        owner: str,
        runner: Runner,
        on_finished: Callable[[list[str]], None],
    ) -> None:
        self.settings = settings
        self.db = db
        self.app = app
        self.redis = client
        self.owner = owner
        self.runner = runner
        self.on_finished = on_finished
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-reconciler", daemon=True)

    def start(self) -> None:
        """Run in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval):
            try:
                self.run_once()
            except Exception:
                # Repairs are retried next round; a transient outage must not kill the worker.
                log.exception("reconcile round failed")

    def run_once(self) -> None:
        """One round: leases, cancellations, then the shared repairs under a lock."""
        held = self.runner.inflight_ids()
        # Only work that is really progressing keeps its leases: a stalled engine lets them
        # run out, so another worker can take the rows.
        if held and self.runner.progressing():
            ids = list(held)
            work.renew_leases(self.db, ids, self.owner, self.settings.lease_seconds)
            with self.db.read() as conn:
                self.runner.abort(work.cancelled_among(conn, ids))
        lock_ms = int(self.settings.reconcile_interval * 900)
        if not self.redis.set(RECONCILE_LOCK, self.owner, nx=True, px=max(lock_ms, 100)):
            return
        requeued, finished = work.requeue_expired_leases(self.db, self.settings.max_attempts)
        finished += work.expire_batches(self.db)
        self._republish(requeued)
        # Files past expires_at (uploads after SLUICE_FILE_TTL_DAYS, outputs after the
        # batch's output_expires_after): deleted, so storage does not grow forever.
        expired = retention.delete_expired_files(self.db)
        if expired:
            log.info("deleted %d expired files", len(expired))
        if finished:
            self.on_finished(finished)

    def _republish(self, rows: list[tuple[int, str, int]]) -> None:
        if not rows:
            return
        by_lane: dict[tuple[str, int], list[int]] = defaultdict(list)
        for rid, model, priority in rows:
            by_lane[(model, priority)].append(rid)
        for (model, priority), ids in by_lane.items():
            publish(self.app, self.settings, model, priority, ids)
        log.info("republished %d queued requests", len(rows))
