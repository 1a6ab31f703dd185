"""Two holes in kombu 5.7's Redis transport after a lost broker connection, closed here.

Both come from one fault class: after the consumer reconnects, work still holding the old
channel (a message acked when its pool thread starts it, the restore of unacked messages at
channel close) reaches for the dropped connection, gets AttributeError ('NoneType' object has
no attribute 'client') instead of a connection error, and the AttributeError kills the
consumer: "Unrecoverable error", the worker exits. Messages are only wake-ups here (the
database is the queue), so an ack or a restore that cannot happen is harmless: Redis
redelivers an unacked message after the visibility timeout and it finds nothing to claim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import redis
from kombu.transport import redis as kombu_redis

_original_connparams = cast("Callable[..., Any]", kombu_redis.Channel._connparams)


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    """The channel's connection parameters; a connection error once its connection is gone."""
    if self.connection is None:
        # A connection error is one the transport lists: acks log it and go on.
        raise redis.exceptions.ConnectionError("the channel's broker connection was dropped")
    return _original_connparams(self, asynchronous)


def harden_redis_transport() -> None:
    """Apply both fixes (idempotent); the worker calls it before it connects."""
    # Nothing needs putting back when a channel closes: skip the restore altogether.
    kombu_redis.QoS.restore_at_shutdown = False
    setattr(kombu_redis.Channel, "_connparams", _connparams)  # noqa: B010 - a patch
