"""Backpressure: beyond SLUICE_MAX_QUEUED_REQUESTS queued requests, submits answer 429."""

from __future__ import annotations

import time

import anyio

from api.errors import ApiError
from sluice.config import Settings
from sluice.db import Database
from sluice.store.batches import count_queued

# The count is a bounded index scan; once a second per API process is plenty, and the
# submits in between add what they queued, so the gauge never runs behind them.
RECOUNT_SECONDS = 1.0


class QueueGauge:
    """A cheap, slightly conservative view of how many requests wait in the queue."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.limit = settings.max_queued_requests
        self._queued = 0
        self._counted_at = -RECOUNT_SECONDS

    async def admit(self) -> None:
        """Raise a 429 ApiError while the queue holds the configured limit or more."""
        if self.limit == 0:
            return
        if time.monotonic() - self._counted_at >= RECOUNT_SECONDS:
            self._queued = await anyio.to_thread.run_sync(
                count_queued, self.db, self.settings.accepted_models, self.limit
            )
            self._counted_at = time.monotonic()
        if self._queued >= self.limit:
            raise ApiError(
                429,
                f"the queue holds {self.limit} or more requests waiting to run; retry later",
                code="queue_full",
                type_="server_error",
                headers={"Retry-After": str(self.settings.retry_after_seconds)},
            )

    def added(self, n: int) -> None:
        """Count requests a submit just queued (until the next recount)."""
        self._queued += n
