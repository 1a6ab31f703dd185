"""Server-sent events in OpenAI's streaming format: chunk shapes and their framing."""

from __future__ import annotations

import json
import time
from typing import Any

from sluice.sampling import CHAT

DONE = b"data: [DONE]\n\n"


def event(obj: Any) -> bytes:
    """One SSE event carrying a JSON object."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", "replace") + b"\n\n"


class Chunks:
    """The chunks of one streamed answer: chat.completion.chunk or text_completion pieces."""

    def __init__(self, endpoint: str, request_id: int, model: str, include_usage: bool) -> None:
        self.chat = endpoint == CHAT
        self.id = f"chatcmpl-{request_id}" if self.chat else f"cmpl-{request_id}"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        base: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [] if choice is None else [choice],
        }
        if self.chat:
            base["system_fingerprint"] = None
        if self.include_usage:
            # As OpenAI: every chunk says usage null until the last one carries it.
            base["usage"] = None
        return base

    def _choice(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def first(self) -> bytes | None:
        """Chat opens with the assistant's role (completions have no opening chunk)."""
        if not self.chat:
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return event(self._chunk(choice))

    def text(self, piece: str) -> bytes:
        """A piece of the answer."""
        return event(self._chunk(self._choice(piece, None)))

    def finish(self, finish_reason: str) -> bytes:
        """The last content chunk: no text, the finish reason."""
        return event(self._chunk(self._choice(None, finish_reason)))

    def usage(self, prompt: int, completion: int, cached: int) -> bytes:
        """The usage chunk (stream_options.include_usage): no choices."""
        chunk = self._chunk(None)
        chunk["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        return event(chunk)


def error_event(message: str, code: str, type_: str = "server_error") -> bytes:
    """An error inside a stream (the status line has gone out already), as vLLM sends it."""
    return event({"error": {"message": message, "type": type_, "param": None, "code": code}})
