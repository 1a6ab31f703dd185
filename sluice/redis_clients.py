"""Redis clients for the API and the worker: stale connections are retried, not failed.

After a Redis restart every pooled connection is dead; the first command on one fails with
"Connection closed by server". Each client retries connection errors a few times with a short
backoff (a fresh connection then succeeds), so a restart costs a retry, not an error.
"""

from __future__ import annotations

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

# 3 retries, 50 ms doubling to at most 1 s: a restarted server is found; a dead one fails fast.
RETRIES = 3
CONNECT_TIMEOUT = 5.0


def sync_client(url: str) -> redis.Redis:
    """A blocking client (the worker's publishes and stats)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        retry_on_error=[ConnectionError, TimeoutError],
    )


def async_client(url: str) -> redis.asyncio.Redis:
    """An asyncio client (the API). No read timeout: long-polls wait on pub/sub sockets."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES),
        retry_on_error=[ConnectionError, TimeoutError],
    )
