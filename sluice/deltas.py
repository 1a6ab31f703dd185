"""The streaming contract between worker and API: one Redis Stream per streaming request.

The worker appends entries as its engine produces text: `a` (the attempt that produced it),
`o` (the character offset of this piece in the output) and `t` (the piece); after the result
is committed, one entry with `e` (end). The API reads with XREAD BLOCK. The stream is bounded
(MAXLEN) and expires: a slow client loses old pieces, never the answer; the API then sends
what it missed from the committed row (the database holds the whole output).
"""

from __future__ import annotations

STREAM_PREFIX = "sluice:stream:"
# Entries kept per request: at a piece per token, 4,096 covers most answers whole; a reader
# further behind than that catches up from the database at the end.
STREAM_MAXLEN = 4096
# A stream outlives its request by this long (reset on every write), then Redis drops it.
STREAM_TTL_SECONDS = 600


def stream_key(job_id: str, request_id: int) -> str:
    """The Redis Stream of one streaming request's text.

    The job id (random) is part of it: request ids restart with a fresh database, and a stream
    left in a shared Redis by an earlier database's request must never be read as this one's.
    """
    return f"{STREAM_PREFIX}{job_id}:{request_id}"
