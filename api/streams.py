"""Streamed answers that fail before their status line when the database is down."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import anyio


async def primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The same chunks, the first one read now: an outage then answers 503, not a cut stream."""
    first = await anyio.to_thread.run_sync(next, chunks, None)
    if first is None:
        return iter(())
    return itertools.chain((first,), chunks)
