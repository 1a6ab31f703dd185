"""The sender: claims due deliveries under a lease, signs and POSTs them, retries with
exponential backoff and jitter. Runs in its own process (`sluice webhooks`), never in a
worker: a slow or dead receiver costs the engine nothing."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from sluice.config import Settings
from sluice.db import Database
from sluice.healthcheck import touch_sender_heartbeat
from sluice.ids import now as clock
from sluice.signals import interrupt_once, signals_held
from sluice.store.deliveries import Attempt, Due, Outcome, claim, disabled_reason, record
from sluice.webhooks.signing import headers
from sluice.webhooks.ssrf import BlockedAddress, Resolver, safe_client, system_resolver

log = logging.getLogger("sluice.webhooks")
# How often the main thread looks whether the loop thread still runs.
MAIN_THREAD_POLL = 0.5

# What a receiver's body may add to the log (we need only its status).
MAX_ERROR_TEXT = 500
# A lease outlives an attempt's worst case: resolution (5 s), connect + write + read
# timeouts (3 x the attempt timeout), plus margin for a busy database.
LEASE_MARGIN = 30.0


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next try after `attempts` failures: exponential, capped, with
    jitter (50-100 %) so that receivers coming back are not hit by every sender at once."""
    delay: float = min(cap, base * 2 ** max(0, attempts - 1))
    return delay * (0.5 + random.random() / 2)


def retry_after(response: httpx.Response) -> float | None:
    """A 429's Retry-After in seconds (delta-seconds form), if usable."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class Sender:
    """A pool of threads delivering webhooks from the database."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        owner: str | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.db = db
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keys = settings.webhook_keys
        self.client = safe_client(settings.webhook_networks, settings.webhook_timeout, resolver)
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, "sluice-webhook")
        self.inflight: set[Future[None]] = set()
        self.lease = 3 * settings.webhook_timeout + LEASE_MARGIN
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sluice-webhooks", daemon=True)

    def start(self) -> None:
        """Run in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; attempts under way finish (each bounded by the timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(self.lease)
        self.pool.shutdown(wait=True)
        self.client.close()

    def alive(self) -> bool:
        """Whether the background loop is running."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            touch_sender_heartbeat(self.settings)  # `sluice healthcheck webhooks` reads it
            claimed = 0
            try:
                claimed = self.run_once()
            except Exception:
                # The database may be away for a while: try again next round.
                log.exception("webhook round failed")
            if not claimed:
                self._wake.wait(self.settings.webhook_poll)
                self._wake.clear()

    def run_once(self) -> int:
        """Claim what fits in the free threads and start sending it; returns how many."""
        self.inflight = {f for f in self.inflight if not f.done()}
        free = self.settings.webhook_concurrency - len(self.inflight)
        if free <= 0:
            return 0
        due = claim(self.db, self.owner, free, self.lease)
        for d in due:
            future = self.pool.submit(self.deliver, d)
            future.add_done_callback(lambda _f: self._wake.set())
            self.inflight.add(future)
        return len(due)

    def deliver(self, due: Due) -> None:
        """One attempt at one delivery, logged."""
        try:
            attempt = self._attempt(due)
        except Exception as exc:  # a bug must not kill the thread; the lease expires
            log.exception("webhook %s: attempt failed unexpectedly", due.id)
            attempt = Attempt(clock(), 0, None, f"internal error: {exc}", Outcome.RETRYING)
            attempt.next_attempt_at = self._next(due, None)
            if attempt.next_attempt_at is None:
                attempt.outcome = Outcome.FAILED
        if not record(self.db, self.owner, due, due.url, attempt):
            log.warning("webhook %s: lease lost before the result was recorded", due.id)
            return
        log.info(
            "webhook %s to %s: attempt %d %s (%s)",
            due.id,
            due.url,
            due.attempts + 1,
            attempt.outcome,
            attempt.status_code or attempt.error,
        )

    def _attempt(self, due: Due) -> Attempt:
        started = clock()
        t0 = time.monotonic()

        def done(
            outcome: Outcome, code: int | None, error: str | None, wait: float | None = None
        ) -> Attempt:
            ms = int((time.monotonic() - t0) * 1000)
            if outcome == Outcome.RETRYING:
                at = self._next(due, wait)
                if at is None:
                    gave_up = f"gave up after {due.attempts + 1} attempts"
                    return Attempt(started, ms, code, f"{error}; {gave_up}", Outcome.FAILED)
                return Attempt(started, ms, code, error, outcome, at)
            return Attempt(started, ms, code, error, outcome)

        if reason := disabled_reason(self.db, due.url):
            return done(Outcome.DISABLED, None, f"endpoint disabled: {reason}")
        if not self.keys:
            return done(Outcome.RETRYING, None, "no SLUICE_WEBHOOK_SECRET to sign with")
        body = due.payload.encode()
        signed = headers(self.keys, due.id, int(time.time()), body)
        try:
            # Streamed and never read: a receiver's body (maybe huge) is not our business.
            with self.client.stream(
                "POST",
                due.url,
                content=body,
                headers={**signed, "content-type": "application/json", "user-agent": "Sluice"},
            ) as response:
                code = response.status_code
                location = response.headers.get("location", "")[:200]
                wait = retry_after(response)
        except BlockedAddress as exc:
            # Where the URL leads is not allowed; retrying would not change the rule.
            return done(Outcome.FAILED, None, f"blocked: {exc}")
        except httpx.TimeoutException as exc:
            return done(Outcome.RETRYING, None, f"timed out ({type(exc).__name__})")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return done(Outcome.RETRYING, None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT])
        if 200 <= code < 300:
            return done(Outcome.SUCCEEDED, code, None)
        if code == 410:
            return done(Outcome.DISABLED, code, "410 Gone: endpoint disabled")
        if 300 <= code < 400:
            return done(Outcome.RETRYING, code, f"redirect to {location!r} not followed")
        if code == 429:
            return done(Outcome.RETRYING, code, "429 Too Many Requests", wait)
        return done(Outcome.RETRYING, code, f"HTTP {code}")

    def _next(self, due: Due, at_least: float | None) -> float | None:
        """When to try again, or None once the retry window (webhook_retry_for) is spent."""
        s = self.settings
        wait = backoff(due.attempts + 1, s.webhook_backoff_base, s.webhook_backoff_max)
        if at_least is not None:
            wait = max(wait, at_least)
        at = clock() + wait
        return at if at <= due.created_at + s.webhook_retry_for else None


def run_sender(settings: Settings) -> int:
    """`sluice webhooks`: deliver until SIGTERM/SIGINT."""
    from sluice.db import get_database

    db = get_database(settings)
    sender: Sender | None = None
    try:  # SIGTERM arrives as KeyboardInterrupt, whenever it comes (even during start-up)
        # The loop runs in its own thread and this one only sleeps: a KeyboardInterrupt
        # inside a lock could break it (sluice/signals.py). Start-up holds the signals back.
        with signals_held():
            interrupt_once()
            sender = Sender(settings, db)
            sender.start()
        if not sender.keys:
            log.warning("SLUICE_WEBHOOK_SECRET is not set: webhook URLs are refused by the API")
        log.info("webhook sender %s started", sender.owner)
        while sender.alive():
            time.sleep(MAIN_THREAD_POLL)
        log.error("the webhook sender's loop ended on its own")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if sender is not None:
            sender.stop()
        db.dispose()
