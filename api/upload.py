"""Streaming multipart uploads: the body is parsed as it arrives and fed to FileIngest.

Memory stays flat whatever the file size: no part is ever held whole, and the database
work runs in a worker thread, one step after another, in arrival order. On SQLite the
file part is spooled to disk first (see _SpoolSink).
"""

from __future__ import annotations

import tempfile
from types import TracebackType
from typing import IO

import anyio
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from sluice.config import Settings
from sluice.db import Database
from sluice.errors import InvalidInput, TooLarge
from sluice.store.ingest import FileIngest, StoredFile

# Room for the multipart boundaries, part headers and small fields around the file.
MULTIPART_OVERHEAD = 64 * 1024
# Bytes gathered before one hop to the database thread.
FEED_BYTES = 256 * 1024
SPOOL_READ_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 1024
MAX_FILENAME = 255  # what files.filename holds
PURPOSES = ("batch",)


def body_limit(settings: Settings) -> int:
    """The largest request body an upload may have."""
    return settings.max_file_bytes + MULTIPART_OVERHEAD


class _Parts:
    """Collects what the parser's callbacks report; the upload loop acts on it."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self.kind = ""  # "file", "purpose", or "" for a part that is skipped
        self.filename: str | None = None
        self.file_seen = False
        self.file_done = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.purpose: str | None = None
        self._purpose_buf = bytearray()
        self.problem: InvalidInput | None = None
        self.ended = False

    def on_part_begin(self) -> None:
        self.headers = {}
        self.kind = ""

    # python-multipart bounds each part header (4 kB) and their count (8).
    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition"))
        name = params.get(b"name", b"")
        if name == b"file":
            if self.file_seen:
                self._fail("send exactly one file part", "file")
                return
            self.kind = "file"
            self.file_seen = True
            raw = params.get(b"filename") or b"upload.jsonl"
            filename = raw.decode("utf-8", "replace")
            if "\x00" in filename:
                self._fail("the file's filename must not contain NUL", "file")
            elif len(filename) > MAX_FILENAME:
                self._fail(f"the file's filename is over {MAX_FILENAME} characters", "file")
            self.filename = filename[:MAX_FILENAME].replace("\x00", "")
        elif name == b"purpose":
            self.kind = "purpose"
            self._purpose_buf.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.kind == "file":
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        elif self.kind == "purpose":
            self._purpose_buf += data[start:end]
            if len(self._purpose_buf) > MAX_FIELD_BYTES:
                self._fail("purpose is too long", "purpose")
                self.kind = ""

    def on_part_end(self) -> None:
        if self.kind == "file":
            self.file_done = True
        elif self.kind == "purpose":
            self.purpose = self._purpose_buf.decode("utf-8", "replace").strip()
            if self.purpose not in PURPOSES:
                self._fail(
                    f"purpose must be one of {', '.join(PURPOSES)}, not {self.purpose!r}", "purpose"
                )
        self.kind = ""

    def on_end(self) -> None:
        self.ended = True

    def _fail(self, message: str, param: str) -> None:
        if self.problem is None:
            self.problem = InvalidInput(message, param=param, code="invalid_value")

    def take(self) -> bytes:
        """The file bytes gathered since the last take."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return data


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidInput(
            "the upload must be multipart/form-data with a `file` part and a `purpose` field",
            param="file",
            code="invalid_value",
        )
    return boundary


class _Sink:
    """Where the file part's bytes go: straight into FileIngest, row batches as they come."""

    def __init__(self, db: Database, settings: Settings, owner: str, filename: str) -> None:
        self.ingest = FileIngest(
            db, filename, "batch", owner,
            settings.max_file_bytes, settings.max_line_bytes, settings.file_ttl_days,
            settings.output_tokens_limit, settings.engine, settings.task,
        )  # fmt: skip
        self._open = False

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self.ingest.__enter__)
        self._open = True

    async def write(self, data: bytes) -> None:
        await anyio.to_thread.run_sync(self.ingest.feed, data)

    async def finish(self) -> StoredFile:
        try:
            stored = await anyio.to_thread.run_sync(self.ingest.finish)
        except BaseException as exc:
            await self._exit(exc)
            raise
        await self._exit(None)  # commits
        return stored

    async def abort(self, exc: BaseException) -> None:
        await self._exit(exc)

    async def _exit(self, exc: BaseException | None) -> None:
        if not self._open:
            return
        self._open = False
        # Shielded: a client gone mid-upload must still see its transaction rolled back.
        with anyio.CancelScope(shield=True):
            tb: TracebackType | None = exc.__traceback__ if exc else None
            await anyio.to_thread.run_sync(
                self.ingest.__exit__, type(exc) if exc else None, exc, tb
            )


class _SpoolSink(_Sink):
    """SQLite: spool to disk first, then ingest in one quick transaction.

    SQLite has one writer at a time; fed straight from the network, a slow client would
    hold the write lock (and stall every worker's result writes) for its whole upload.
    """

    def __init__(self, db: Database, settings: Settings, owner: str, filename: str) -> None:
        super().__init__(db, settings, owner, filename)
        self.max_bytes = settings.max_file_bytes
        self.spool_dir = settings.data_dir / "uploads"
        self.size = 0
        self.file: IO[bytes] | None = None

    async def open(self) -> None:
        def make() -> IO[bytes]:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            # On disk beside the database, not in /tmp (often RAM-backed).
            return tempfile.TemporaryFile(dir=self.spool_dir)

        self.file = await anyio.to_thread.run_sync(make)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise TooLarge(f"file is larger than {self.max_bytes} bytes")
        assert self.file is not None
        await anyio.to_thread.run_sync(self.file.write, data)

    async def finish(self) -> StoredFile:
        assert self.file is not None
        spool = self.file

        def ingest_all() -> StoredFile:
            spool.seek(0)
            with self.ingest:
                while data := spool.read(SPOOL_READ_BYTES):
                    self.ingest.feed(data)
                return self.ingest.finish()

        try:
            return await anyio.to_thread.run_sync(ingest_all)
        finally:
            await self._close_spool()

    async def abort(self, exc: BaseException) -> None:
        await self._close_spool()

    async def _close_spool(self) -> None:
        if self.file is not None:
            spool, self.file = self.file, None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(spool.close)


async def receive_upload(
    request: Request, db: Database, settings: Settings, owner: str
) -> StoredFile:
    """Parse a multipart upload from the request stream and store its file, all or nothing."""
    parts = _Parts()
    parser = MultipartParser(
        _boundary(request),
        {
            "on_part_begin": parts.on_part_begin,
            "on_header_field": parts.on_header_field,
            "on_header_value": parts.on_header_value,
            "on_header_end": parts.on_header_end,
            "on_headers_finished": parts.on_headers_finished,
            "on_part_data": parts.on_part_data,
            "on_part_end": parts.on_part_end,
            "on_end": parts.on_end,
        },
    )
    limit = body_limit(settings)
    received = 0
    sink: _Sink | None = None
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise TooLarge(f"file is larger than {settings.max_file_bytes} bytes")
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidInput(f"malformed multipart body: {exc}", param="file") from None
            if parts.problem is not None:
                raise parts.problem
            if parts.file_seen and sink is None:
                kind = _SpoolSink if db.is_sqlite else _Sink
                sink = kind(db, settings, owner, parts.filename or "upload.jsonl")
                await sink.open()
            if sink is not None and (parts.pending_bytes >= FEED_BYTES or parts.file_done):
                await sink.write(parts.take())
        if not parts.ended:
            raise InvalidInput("the multipart body ended early", param="file")
        if sink is None:
            raise InvalidInput(
                "a `file` part is required", param="file", code="missing_required_parameter"
            )
        if parts.purpose is None:
            raise InvalidInput(
                "purpose is required (use 'batch')",
                param="purpose",
                code="missing_required_parameter",
            )
        if parts.pending_bytes:
            await sink.write(parts.take())
    except BaseException as exc:
        if sink is not None:
            await sink.abort(exc)
        raise
    return await sink.finish()
