"""Helpers for API tests: the running API's handle, JSONL building, error checks."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from sluice.config import Settings
from sluice.db import Database


@dataclass
class Api:
    """A running API: its base URL, settings, an HTTP client, and Redis and DB handles."""

    url: str
    settings: Settings
    http: httpx.Client
    redis: redis.Redis
    db: Database
    # The API key self.http sends (owner "default"; tests/api/test_isolation.py makes others).
    key: str = ""

    @property
    def auth_line(self) -> bytes:
        """The Authorization header line, for requests written by hand on a socket."""
        return f"Authorization: Bearer {self.key}\r\n".encode()

    @property
    def model(self) -> str:
        """The model name this API accepts."""
        return self.settings.served_model

    def queue_length(self, interactive: bool = False) -> int:
        """Messages waiting in this model's queue (kombu keeps a queue as a Redis list)."""
        key = f"sluice.{self.model}" + (".interactive" if interactive else "")
        return int(self.redis.llen(key))

    def queued_ids(self, interactive: bool = False) -> list[list[int]]:
        """The request ids named by each message in the queue (oldest first)."""
        key = f"sluice.{self.model}" + (".interactive" if interactive else "")
        out = []
        for raw in reversed(self.redis.lrange(key, 0, -1)):
            envelope = json.loads(raw)
            # sluice.run_batch(batch_id, model, count, ids=[...], priority=...)
            kwargs = json.loads(base64.b64decode(envelope["body"]))[1]
            out.append(list(kwargs["ids"]))
        return out

    def upload(
        self, content: bytes, purpose: str = "batch", filename: str = "input.jsonl"
    ) -> httpx.Response:
        """POST /v1/files with a multipart body."""
        return self.http.post(
            "/v1/files", files={"file": (filename, content)}, data={"purpose": purpose}
        )


def batch_line(
    custom_id: str,
    model: str,
    *,
    url: str = "/v1/chat/completions",
    body: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One OpenAI batch input line."""
    if body is None:
        body = (
            {"model": model, "messages": [{"role": "user", "content": f"hi {custom_id}"}]}
            if url == "/v1/chat/completions"
            else {"model": model, "prompt": custom_id}
        )
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}


def jsonl(lines: Sequence[dict[str, Any] | bytes]) -> bytes:
    """A JSONL file: dicts are encoded, bytes are taken as they are; ends with a newline."""
    parts = [item if isinstance(item, bytes) else json.dumps(item).encode() for item in lines]
    return b"\n".join(parts) + b"\n"


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI-shaped error of a response (asserting the shape)."""
    body = response.json()
    assert set(body) >= {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code", "line"}, err
    assert err["type"] == "invalid_request_error", err
    assert err["message"], err
    return dict(err)


BOUNDARY = "sluice-test-boundary-7MA4YWxkTrZu0gW"


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with parts in exactly this order: (name, filename, data)."""
    out = bytearray()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/jsonl\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
