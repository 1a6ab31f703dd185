"""Batch input files: split a byte stream into lines, check each, insert them in bulk."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, insert, update

from sluice.capabilities import Task
from sluice.db import Database
from sluice.errors import InvalidInput, TooLarge
from sluice.ids import new_file_id, unix
from sluice.models import file_lines, files
from sluice.prefix import prefix_key, prompt_text
from sluice.sampling import check_endpoint, find_nul, parse_body

INSERT_CHUNK = 2000
MAX_PARAM = 128


class LineSplitter:
    """Feeds bytes in, yields (line_no, raw bytes or None if too long), memory bounded."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._too_long = False
        self.line_no = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes | None]]:
        """Yield every complete line in the data seen so far."""
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._keep(data[start:])
                return
            yield self._emit(data[start:nl])
            start = nl + 1

    def close(self) -> Iterator[tuple[int, bytes | None]]:
        """Yield the last line when the file does not end with a newline."""
        if self._buf or self._too_long:
            yield self._emit(b"")

    def _keep(self, part: bytes) -> None:
        if self._too_long:
            return
        self._buf += part
        if len(self._buf) > self.max_line_bytes:
            # Drop the line's bytes as they come: memory stays flat on a huge line.
            self._too_long = True
            self._buf.clear()

    def _emit(self, tail: bytes) -> tuple[int, bytes | None]:
        self.line_no += 1
        self._keep(tail)
        # A CRLF line keeps its \r (JSON reads it as whitespace): the download is then the
        # upload byte for byte, and a checksum of the input holds.
        line = None if self._too_long else bytes(self._buf)
        self._buf.clear()
        self._too_long = False
        return self.line_no, line


def _error(line_no: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "line_no": line_no,
        "custom_id": None,
        "method": None,
        "url": None,
        "model": None,
        "raw": None,
        "error_code": code,
        "error_message": f"line {line_no}: {message}",
        # The column holds 128 characters; a path into a deeply nested body may be longer.
        "error_param": param[:MAX_PARAM] if param else param,
        "prefix_key": None,
    }


def parse_line(
    line_no: int,
    raw: bytes | None,
    max_line_bytes: int,
    max_tokens_limit: int | None = None,
    engine: str | None = None,
    task: Task = Task.GENERATE,
) -> dict[str, Any]:
    """Check one OpenAI batch line; returns its file_lines row (with an error if bad).

    engine: the served engine's name; a field it cannot honour is that line's error.
    task: what the served model does; a url it does not serve is that line's error.
    """
    row = _check_line(line_no, raw, max_line_bytes, max_tokens_limit, engine, task)
    if row["raw"] is None and raw is not None and b"\x00" not in raw:
        # A bad line keeps its text so the file downloads as uploaded; NUL bytes cannot
        # be stored in PostgreSQL text, and undecodable bytes are not text at all.
        with contextlib.suppress(UnicodeDecodeError):
            row["raw"] = raw.decode("utf-8")
    return row


def _check_line(
    line_no: int,
    raw: bytes | None,
    max_line_bytes: int,
    max_tokens_limit: int | None,
    engine: str | None,
    task: Task,
) -> dict[str, Any]:
    if raw is None:
        return _error(line_no, "line_too_long", f"longer than {max_line_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error(line_no, "invalid_json_line", f"not valid UTF-8 (byte {exc.start})")
    if not text.strip():
        return _error(line_no, "invalid_json_line", "blank line")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _error(line_no, "invalid_json_line", f"not valid JSON ({exc.msg})")
    if not isinstance(obj, dict):
        return _error(line_no, "invalid_json_line", "must be a JSON object")
    # A NUL can only arrive escaped (JSON forbids raw control characters in strings), so
    # the walk runs only for the rare line that holds the escape.
    if b"\\u0000" in raw and (where := find_nul(obj)) is not None:
        return _error(line_no, "invalid_value", f"{where} must not contain NUL (\\u0000)", where)
    for name in ("custom_id", "method", "url", "body"):
        if obj.get(name) in (None, ""):
            return _error(line_no, "missing_required_parameter", f"{name} is required", name)
    custom_id, method, url = obj["custom_id"], obj["method"], obj["url"]
    if not isinstance(custom_id, str) or len(custom_id) > 512 or "\x00" in custom_id:
        return _error(
            line_no,
            "invalid_value",
            "custom_id must be a string of up to 512 characters, without NUL",
            "custom_id",
        )
    if method != "POST":
        return _error(line_no, "invalid_method", "method must be POST", "method")
    try:
        check_endpoint(url, task, "url")
    except InvalidInput as exc:
        return _error(line_no, exc.code, exc.message, "url")
    try:
        parsed = parse_body(url, obj["body"], max_tokens_limit=max_tokens_limit, engine=engine)
    except InvalidInput as exc:
        return _error(line_no, exc.code, exc.message, f"body.{exc.param or ''}".rstrip("."))
    if not parsed.model:
        return _error(line_no, "missing_required_parameter", "body.model is required", "body.model")
    return {
        "line_no": line_no,
        "custom_id": custom_id,
        "method": method,
        "url": url,
        "model": parsed.model,
        "raw": text,
        "error_code": None,
        "error_message": None,
        "error_param": None,
        "prefix_key": prefix_key(prompt_text(parsed.prompt, parsed.messages)),
    }


@dataclass
class StoredFile:
    """What an upload produced."""

    id: str
    bytes: int
    lines: int
    bad_lines: int


class FileIngest:
    """Receives an upload chunk by chunk and writes its lines in one transaction."""

    def __init__(
        self,
        db: Database,
        filename: str,
        purpose: str,
        owner: str,
        max_bytes: int,
        max_line_bytes: int,
        ttl_days: int,
        max_tokens_limit: int | None = None,
        engine: str | None = None,
        task: Task = Task.GENERATE,
    ) -> None:
        self.db = db
        self.engine = engine
        self.task = task
        self.id = new_file_id()
        self.filename = filename
        self.purpose = purpose
        self.owner = owner
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self.ttl_days = ttl_days
        self.max_tokens_limit = max_tokens_limit
        self.bytes = 0
        self.bad_lines = 0
        self._splitter = LineSplitter(max_line_bytes)
        self._pending: list[dict[str, Any]] = []
        self._conn: Connection | None = None
        self._ctx: Any = None

    def __enter__(self) -> FileIngest:
        self._ctx = self.db.write()
        self._conn = self._ctx.__enter__()
        now = unix()
        self._conn.execute(
            insert(files).values(
                id=self.id,
                owner=self.owner,
                purpose=self.purpose,
                filename=self.filename,
                bytes=0,
                line_count=0,
                bad_lines=0,
                created_at=now,
                expires_at=now + self.ttl_days * 86400,
            )
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        ctx, self._ctx, self._conn = self._ctx, None, None
        ctx.__exit__(*exc)

    def feed(self, data: bytes) -> None:
        """Take the next chunk of the upload; rows go to the database in batches."""
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise TooLarge(f"file is larger than {self.max_bytes} bytes")
        for line_no, raw in self._splitter.feed(data):
            self._add(line_no, raw)

    def finish(self) -> StoredFile:
        """Flush the last lines and record the file's size; commit happens on exit."""
        for line_no, raw in self._splitter.close():
            self._add(line_no, raw)
        self._flush()
        assert self._conn is not None
        lines = self._splitter.line_no
        self._conn.execute(
            update(files)
            .where(files.c.id == self.id)
            .values(bytes=self.bytes, line_count=lines, bad_lines=self.bad_lines)
        )
        return StoredFile(self.id, self.bytes, lines, self.bad_lines)

    def _add(self, line_no: int, raw: bytes | None) -> None:
        row = parse_line(
            line_no, raw, self.max_line_bytes, self.max_tokens_limit, self.engine, self.task
        )
        if row["error_code"]:
            self.bad_lines += 1
        row["file_id"] = self.id
        self._pending.append(row)
        if len(self._pending) >= INSERT_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        assert self._conn is not None
        rows, self._pending = self._pending, []
        if self.db.is_postgres:
            _copy_rows(self._conn, rows)
        else:
            self._conn.execute(insert(file_lines), rows)


_COPY_COLUMNS = (
    "file_id",
    "line_no",
    "custom_id",
    "method",
    "url",
    "model",
    "raw",
    "error_code",
    "error_message",
    "error_param",
    "prefix_key",
)


def _copy_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL COPY: about twice as fast as a multi-row INSERT for bulk lines."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    sql = f"COPY file_lines ({', '.join(_COPY_COLUMNS)}) FROM STDIN"
    with cursor.copy(sql) as copy:
        for row in rows:
            copy.write_row(tuple(row[c] for c in _COPY_COLUMNS))
