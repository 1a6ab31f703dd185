"""Logging setup: text or JSON lines (SLUICE_LOG_FORMAT), with batch and request ids.

Ids travel as `extra={"batch_id": ..., "request_ids": ...}` on a call, or for a stretch of
code through `log_context(...)`. Prompts and outputs are never logged: code that would show
one passes it through `prompt_text()`, which hides it unless SLUICE_LOG_PROMPTS is set.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "sluice_log_context", default=None
)
_log_prompts = False
# Attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids and other extras."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_context.get() or {})
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """The plain line, with the batch id appended where one is known."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as text."""
        line = super().format(record)
        ids = {**(_context.get() or {}), **{k: v for k, v in vars(record).items()
                                             if k in ("batch_id", "request_id")}}  # fmt: skip
        if ids.get("batch_id") and str(ids["batch_id"]) not in line:
            line += f" [batch {ids['batch_id']}]"
        return line


def setup_logging(fmt: str = "text", level: str = "INFO", log_prompts: bool = False) -> None:
    """Configure the root logger once per process (every command calls this first)."""
    global _log_prompts
    _log_prompts = log_prompts
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (e.g. Celery's SecurityWarning) become records in the same format.
    logging.captureWarnings(True)


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Add these ids (batch_id=..., request_ids=...) to every record logged inside."""
    token = _context.set({**(_context.get() or {}), **ids})
    try:
        yield
    finally:
        _context.reset(token)


def prompt_text(text: str) -> str:
    """A prompt or output as it may appear in a log: its length only, unless allowed."""
    return text if _log_prompts else f"<{len(text)} characters hidden; SLUICE_LOG_PROMPTS=true>"
