"""Real HTTP receivers for webhook tests: a threaded http.server with scripted answers."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival


@dataclass
class Answer:
    """What a receiver says: status, headers, and a delay before it (a slow receiver)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Receiver:
    """A running receiver: its URL, the calls it got, and its script (call number -> Answer)."""

    url: str
    calls: list[Call]
    script: Callable[[int], Answer]
    release: threading.Event

    def wait_calls(self, n: int, timeout: float = 20.0) -> list[Call]:
        """Poll until at least n calls arrived (a deadline, not a sleep)."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} calls, wanted {n}"
            time.sleep(0.02)
        return list(self.calls)


@contextmanager
def receiver(
    script: Callable[[int], Answer] | None = None,
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> Iterator[Receiver]:
    """Serve on a free port of host until the block ends."""
    calls: list[Call] = []
    release = threading.Event()
    rec = Receiver("", calls, script or (lambda _n: Answer()), release)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            calls.append(Call(self.path, headers, body, time.monotonic()))
            answer = rec.script(len(calls))
            if answer.delay:
                # Waits for the delay or the end of the test, whichever comes first.
                release.wait(answer.delay)
            self.send_response(answer.status)
            for k, v in answer.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        do_GET = do_POST

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    rec.url = f"{scheme}://{host}:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield rec
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
