"""/v1/embeddings: the body checked, the vectors stored as delivered, the response shaped.

Served when SLUICE_TASK=embed on an engine that pools (vLLM's pooling runner; echo for tests).
A request embeds one input or a list of them (OpenAI's limit: 2048), each a text or token
ids. Vectors go out as JSON floats, or with encoding_format base64 as little-endian float32
bytes in base64: what the openai client asks for by default (it decodes them itself).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sluice.errors import InvalidInput

FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
MAX_INPUTS = 2048
ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbedInput:
    """A checked embeddings body: its inputs (text, or token ids) and how vectors go out."""

    inputs: tuple[str | tuple[int, ...], ...]
    base64: bool = False


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _inputs(raw: Any) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four forms: a string, strings, token ids, lists of token ids."""
    if raw is None:
        raise InvalidInput(
            "input is required for /v1/embeddings", param="input", code="missing_required_parameter"
        )
    if isinstance(raw, str) or _token_ids(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > MAX_INPUTS:
        raise InvalidInput(
            f"input must be a string, token ids, or a list of 1 to {MAX_INPUTS} of either",
            param="input",
            code="invalid_value",
        )
    out: list[str | tuple[int, ...]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            out.append(item)
        elif _token_ids(item):
            out.append(tuple(item))
        else:
            raise InvalidInput(
                f"input[{i}] must be a non-empty string or a non-empty list of token ids "
                "(integers >= 0)",
                param=f"input[{i}]",
                code="invalid_value",
            )
    return tuple(out)


def parse_embedding_body(body: dict[str, Any]) -> EmbedInput:
    """Check an embeddings body (unknown fields and `user` already checked by sluice.sampling);
    InvalidInput names the field."""
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ENCODINGS:
        raise InvalidInput(
            f"encoding_format must be one of {', '.join(ENCODINGS)}",
            param="encoding_format",
            code="invalid_value",
        )
    # vLLM shortens vectors only for Matryoshka-trained models; a plain model would return
    # a truncated vector that means nothing, so the field is refused rather than guessed at.
    if body.get("dimensions") is not None:
        raise InvalidInput(
            "dimensions is not supported by this service; leave it out",
            param="dimensions",
            code="unsupported_parameter",
        )
    return EmbedInput(_inputs(body.get("input")), base64=encoding == "base64")


def stored_vectors(vectors: Sequence[Sequence[float]], as_base64: bool) -> str:
    """The vectors as the response carries them (floats, or base64 float32), as JSON text."""
    if not as_base64:
        return json.dumps([list(v) for v in vectors], separators=(",", ":"))
    return json.dumps(
        [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
    )


def embedding_body(req: Mapping[Any, Any]) -> dict[str, Any]:
    """OpenAI's embeddings response (object "list") of a succeeded request row."""
    vectors = json.loads(req["output_text"] or "[]")
    prompt_tokens = int(req["prompt_tokens"] or 0)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(vectors)
        ],
        "model": req["model"],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
