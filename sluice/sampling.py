"""Request bodies: check a chat/completions body once, the same way everywhere."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sluice.errors import InvalidInput

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
ROLES = ("system", "user", "assistant", "developer", "tool")
DEFAULT_MAX_TOKENS = 256
# What the columns hold (sluice.models): a longer model name could not be stored.
MAX_MODEL_NAME = 256
# OpenAI's seed is a signed 64-bit integer; vLLM and the database agree.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters (names and meaning as OpenAI's and vLLM's SamplingParams)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extension: generate exactly max_tokens (benchmarks with fixed output lengths).
    ignore_eos: bool = False


@dataclass(frozen=True)
class ParsedBody:
    """A checked body: the prompt (or chat messages) and its sampling."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: Sampling


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a number", param=name, code="invalid_value")
    if not lo <= value <= hi:
        raise InvalidInput(
            f"{name} must be between {lo} and {hi}", param=name, code="invalid_value"
        )
    return float(value)


def _max_tokens(body: dict[str, Any], limit: int | None) -> int:
    # max_completion_tokens is the newer OpenAI name for the same thing.
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    value = body.get(name, DEFAULT_MAX_TOKENS)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{name} must be a positive integer", param=name, code="invalid_value")
    if limit is not None and value > limit:
        # Refused at entry: it could never fit the model's context, so it would only fail later.
        raise InvalidInput(
            f"{name} must be at most {limit} (the model's limit), not {value}",
            param=name,
            code="invalid_value",
        )
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > 4
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise InvalidInput(
            "stop must be a string or a list of up to 4 non-empty strings",
            param="stop",
            code="invalid_value",
        )
    return tuple(stop)


def _seed(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidInput(
            "seed must be an integer between -2^63 and 2^63-1", param="seed", code="invalid_value"
        )
    return seed


def _top_p(body: dict[str, Any]) -> float:
    # As vLLM's own server: top_p is in (0, 1]. 0 is refused, never silently run as 1.0
    # (temperature 0 is how to ask for greedy decoding).
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise InvalidInput(
            "top_p must be greater than 0 and at most 1 (use temperature 0 for greedy decoding)",
            param="top_p",
            code="invalid_value",
        )
    return top_p


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false", param=name, code="invalid_value")
    return value


def parse_sampling(body: dict[str, Any], max_tokens_limit: int | None = None) -> Sampling:
    """Check the sampling fields of a body; raises InvalidInput naming the field."""
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n != 1):
        raise InvalidInput("only n=1 is supported", param="n", code="invalid_value")
    if body.get("stream"):
        raise InvalidInput(
            "stream is not supported in batches", param="stream", code="invalid_value"
        )
    return Sampling(
        max_tokens=_max_tokens(body, max_tokens_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        stop=_stop(body),
        seed=_seed(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidInput(
            "messages is required for /v1/chat/completions",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(
            "messages must be a non-empty list", param="messages", code="invalid_value"
        )
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidInput(f"{where} must be an object", param=where, code="invalid_value")
        if msg.get("role") not in ROLES:
            raise InvalidInput(
                f"{where}.role must be one of {', '.join(ROLES)}",
                param=f"{where}.role",
                code="invalid_value",
            )
        content = msg.get("content")
        if isinstance(content, list):
            # OpenAI's content parts: only text parts make sense for a text model.
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise InvalidInput(
                    f"{where}.content parts must be text parts",
                    param=f"{where}.content",
                    code="invalid_value",
                )
        elif not isinstance(content, str):
            raise InvalidInput(
                f"{where}.content must be a string", param=f"{where}.content", code="invalid_value"
            )
    return messages


def message_text(content: Any) -> str:
    """The text of a message's content (a string, or a list of text parts)."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content)
    return str(content)


def find_nul(value: Any, path: str = "") -> str | None:
    """The path of the first string (or object key) holding NUL, e.g. messages[0].content."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key).replace("\x00", "\\u0000")  # the path is echoed back in errors
            where = f"{path}.{name}" if path else name
            if isinstance(key, str) and "\x00" in key:
                return where
            found = find_nul(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_nul(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_body(
    endpoint: str, body: Any, *, max_tokens_limit: int | None = None, check_nul: bool = False
) -> ParsedBody:
    """Check a chat or completions body; raises InvalidInput naming the field.

    At entry (the API) pass the model's max_tokens_limit and check_nul: PostgreSQL text
    cannot hold NUL, and a prompt holding one is never what a client meant.
    """
    if not isinstance(body, dict):
        raise InvalidInput("body must be an object", param="body", code="invalid_value")
    if check_nul and (where := find_nul(body)) is not None:
        raise InvalidInput(
            f"{where} must not contain NUL (\\u0000)", param=where, code="invalid_value"
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidInput("model must be a string", param="model", code="invalid_value")
    if model is not None and len(model) > MAX_MODEL_NAME:
        raise InvalidInput(
            f"model must be at most {MAX_MODEL_NAME} characters, not {len(model)}",
            param="model",
            code="invalid_value",
        )
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    if endpoint == CHAT:
        messages = _messages(body)
    elif endpoint == COMPLETIONS:
        raw = body.get("prompt")
        if raw is None:
            raise InvalidInput(
                "prompt is required for /v1/completions",
                param="prompt",
                code="missing_required_parameter",
            )
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str):
            raise InvalidInput("prompt must be a string", param="prompt", code="invalid_value")
        prompt = raw
    else:
        raise InvalidInput(
            f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint", code="invalid_url"
        )
    return ParsedBody(
        model=model,
        prompt=prompt,
        messages=messages,
        sampling=parse_sampling(body, max_tokens_limit),
    )
