"""A small HTTP client for the Sluice API (used by the CLI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from sluice.errors import InvalidInput, SluiceError
from sluice.sampling import CHAT, COMPLETIONS


class ApiError(SluiceError):
    """The API answered with an error."""


class Client:
    """Files, batches and results over HTTP."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        # api_key: SLUICE_API_KEY or the local key of `sluice up` (sluice.local_key.client_key).
        # None sends no key: the API then answers 401 naming what is missing.
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=120,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )

    def _check(self, resp: httpx.Response) -> Any:
        if resp.status_code >= 400:
            try:
                msg = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = resp.text
            raise ApiError(
                f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {msg}"
            )
        return resp.json()

    def upload(self, path: Path) -> dict[str, Any]:
        """Upload a batch input file."""
        with path.open("rb") as fh:
            return dict(
                self._check(
                    self.http.post(
                        "/v1/files", data={"purpose": "batch"}, files={"file": (path.name, fh)}
                    )
                )
            )

    def create_batch(self, file_id: str, endpoint: str, window: str = "24h") -> dict[str, Any]:
        """Start a batch on an uploaded file."""
        return dict(
            self._check(
                self.http.post(
                    "/v1/batches",
                    json={
                        "input_file_id": file_id,
                        "endpoint": endpoint,
                        "completion_window": window,
                    },
                )
            )
        )

    def models(self) -> list[dict[str, Any]]:
        """The models the server serves (the first is the one `sluice run` defaults to)."""
        return list(self._check(self.http.get("/v1/models"))["data"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        """One batch."""
        return dict(self._check(self.http.get(f"/v1/batches/{batch_id}")))

    def batches(self, limit: int = 20) -> list[dict[str, Any]]:
        """Recent batches, newest first."""
        return list(self._check(self.http.get("/v1/batches", params={"limit": limit}))["data"])

    def status(self, batches: int = 10) -> dict[str, Any]:
        """The deployment now: queue, workers, throughput, recent batches (`sluice status`)."""
        return dict(self._check(self.http.get("/v1/admin/status", params={"batches": batches})))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch."""
        return dict(self._check(self.http.post(f"/v1/batches/{batch_id}/cancel")))

    def stream(self, path: str) -> Iterator[bytes]:
        """Stream a download (file content or partial results)."""
        with self.http.stream("GET", path) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            yield from resp.iter_bytes()


def to_batch_lines(src: Path, dst: Path, model: str) -> tuple[str, int]:
    """Convert a prompts file to OpenAI batch lines; returns (endpoint, count).

    Lines that already are batch lines pass through; `{"prompt": ...}` and
    `{"messages": [...]}` lines become requests numbered by line.
    """
    endpoints: set[str] = set()
    count = 0
    with src.open("rb") as fin, dst.open("w", encoding="utf-8") as fout:
        for n, raw in enumerate(fin, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                raise InvalidInput(f"{src}:{n}: not valid JSON", line=n) from None
            if not isinstance(obj, dict):
                raise InvalidInput(f"{src}:{n}: each line must be a JSON object", line=n)
            if "custom_id" in obj and "body" in obj:
                line = obj
            else:
                url = CHAT if "messages" in obj else COMPLETIONS
                if url == COMPLETIONS and "prompt" not in obj:
                    raise InvalidInput(f"{src}:{n}: needs prompt or messages", line=n)
                body = {"model": model, **obj}
                line = {"custom_id": f"line-{n}", "method": "POST", "url": url, "body": body}
            endpoints.add(str(line.get("url")))
            fout.write(json.dumps(line) + "\n")
            count += 1
    if len(endpoints) > 1:
        raise InvalidInput(
            f"{src}: mixes {' and '.join(sorted(endpoints))}; a batch uses one endpoint"
        )
    return (endpoints.pop() if endpoints else CHAT), count
