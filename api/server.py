"""uvicorn's httptools protocol with a bound on the request line and headers.

httptools has no limit of its own: it gathers a header as it arrives, and 100 MB of
headers took 10 s of CPU and the memory to match. Here the bytes that arrive before the
headers end are counted, and past SLUICE_MAX_HEADER_BYTES the client gets 431 and the
connection is closed. Use it as uvicorn's `http`: "api.server:BoundedHttpToolsProtocol".
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sluice.config import get_settings

MESSAGE = b"request headers too large"


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that answers 431 once a request's head passes max_head_bytes."""

    # None: SLUICE_MAX_HEADER_BYTES (subclasses, e.g. in tests, may fix a number).
    max_head_bytes: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.max_head_bytes
        self._head_limit = limit if limit is not None else get_settings().max_header_bytes
        self._in_head = True
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start counting the first request's head."""
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        """Feed the parser; refuse the request once its head is over the limit."""
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after feeding: a chunk that ends the head and starts the body is fine.
        if (
            self._in_head
            and self._head_bytes > self._head_limit
            and not self.transport.is_closing()
        ):
            self._refuse()

    def on_headers_complete(self) -> None:
        """The head is complete: stop counting until the next request."""
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The next bytes on this connection start another request's head."""
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _refuse(self) -> None:
        self.logger.warning("request head over %d bytes: 431, connection closed", self._head_limit)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(MESSAGE)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + MESSAGE
        )
        self.transport.close()


def bounded(max_head_bytes: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class with a fixed head limit (for servers built with explicit settings)."""
    return type("BoundedHttpTools", (BoundedHttpToolsProtocol,), {"max_head_bytes": max_head_bytes})
