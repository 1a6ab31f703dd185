"""Request bodies: check a chat/completions/responses body once, the same way everywhere.

One checker for every path (batch lines at upload, /v1/jobs, the online endpoints, and the
worker again before the engine): a field is either honoured by the served engine, or refused
naming it (sluice.capabilities says which engine honours which optional field). Unknown fields
are refused too: a misspelt parameter must not run as if it were absent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sluice import capabilities as caps
from sluice.capabilities import Task
from sluice.embeddings import FIELDS as EMBEDDING_FIELDS
from sluice.embeddings import EmbedInput, parse_embedding_body
from sluice.errors import InvalidInput

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
# The `include` item that asks /v1/responses for output token logprobs.
RESPONSE_LOGPROBS = "message.output_text.logprobs"
EMBEDDINGS = "/v1/embeddings"
# What each task serves (SLUICE_TASK): a generative model, or an embedding (pooling) one.
SERVED: dict[Task, tuple[str, ...]] = {
    Task.GENERATE: (CHAT, COMPLETIONS, RESPONSES),
    Task.EMBED: (EMBEDDINGS,),
}
ENDPOINTS = SERVED[Task.GENERATE]
ROLES = ("system", "user", "assistant", "developer", "tool")
DEFAULT_MAX_TOKENS = 256
# What the columns hold (sluice.models): a longer model name could not be stored.
MAX_MODEL_NAME = 256
# OpenAI's seed is a signed 64-bit integer; vLLM and the database agree.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# OpenAI's limits: n up to 128, top_logprobs up to 20 (chat), logprobs up to 5 (completions).
MAX_N = 128
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# OpenAI's metadata: up to 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA = 16
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Every field a body may carry, per endpoint; anything else is refused as unknown.
_SAMPLER = {
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "presence_penalty", "frequency_penalty", "n", "stream", "stream_options", "user",
    "metadata", "top_k", "min_p", "repetition_penalty", "logprobs", "response_format",
    "ignore_eos", "logit_bias", "service_tier", "store",
}  # fmt: skip
_TOOLS = ("tools", "functions", "tool_choice", "function_call", "parallel_tool_calls")
CHAT_FIELDS = frozenset(
    _SAMPLER
    | {"messages", "top_logprobs", "reasoning_effort", "modalities", "audio", "prediction"}
    | {"web_search_options", *_TOOLS}
)
COMPLETION_FIELDS = frozenset(_SAMPLER | {"prompt", "echo", "best_of", "suffix"})
RESPONSE_FIELDS = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text"}
    | {"metadata", "user", "store", "stream", "service_tier", "truncation", "reasoning"}
    | {"previous_response_id", "include", "background", "top_logprobs", *_TOOLS}
)


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
    n: int = 1
    top_k: int = 0  # 0: every token (vLLM also takes -1 for that)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # Log probabilities of the chosen tokens with this many alternatives each; None: none.
    logprobs: int | None = None
    # response_format: json_object, or json_schema's schema as canonical JSON text.
    json_object: bool = False
    json_schema: str | None = None


# An embeddings request generates nothing: no output tokens to budget for.
NO_SAMPLING = Sampling(max_tokens=0)


@dataclass(frozen=True)
class ParsedBody:
    """A checked body: the prompt (or chat messages) and its sampling."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: Sampling
    embed: EmbedInput | None = None  # /v1/embeddings: the inputs (no prompt, no sampling)


def check_endpoint(endpoint: Any, task: Task, param: str, code: str = "invalid_url") -> str:
    """The endpoint, if the served model's task serves it; else InvalidInput saying which do."""
    served = SERVED[task]
    if endpoint in served:
        return str(endpoint)
    if endpoint == EMBEDDINGS:
        message = (
            f"{EMBEDDINGS} needs an embedding (pooling) model; this service runs a generative "
            f"model (endpoints: {', '.join(served)})"
        )
    elif endpoint in ENDPOINTS:
        message = (
            f"{endpoint} needs a generative model; this service runs an embedding model "
            f"(endpoints: {', '.join(served)})"
        )
    else:
        message = f"{param} must be one of {', '.join(served)}"
    raise InvalidInput(message, param=param, code=code)


def _unsupported(name: str, engine: str | None) -> InvalidInput:
    where = f"the {engine} engine" if engine else "this service"
    return InvalidInput(
        f"{name} is not supported by {where}; leave it out",
        param=name,
        code="unsupported_parameter",
    )


class _Check:
    """One body's checks against the served engine's capabilities."""

    def __init__(self, body: dict[str, Any], engine: str | None) -> None:
        self.body = body
        self.engine = engine
        self.supports = caps.capabilities(engine) if engine is not None else caps.OPTIONAL

    def need(self, name: str, capability: str | None = None) -> None:
        """The field is used: refuse it unless the engine honours it."""
        if (capability or name) not in self.supports:
            raise _unsupported(name, self.engine)

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidInput(f"{name} must be a number", param=name, code="invalid_value")
        if not lo <= value <= hi:
            raise InvalidInput(
                f"{name} must be between {lo} and {hi}", param=name, code="invalid_value"
            )
        return float(value)

    def integer(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInput(
                f"{name} must be an integer between {lo} and {hi}",
                param=name,
                code="invalid_value",
            )
        return value

    def flag(self, name: str) -> bool:
        value = self.body.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false", param=name, code="invalid_value")
        return value


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


def _seed(check: _Check) -> int | None:
    seed = check.body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidInput(
            "seed must be an integer between -2^63 and 2^63-1", param="seed", code="invalid_value"
        )
    check.need("seed")
    return seed


def _top_p(check: _Check) -> float:
    # As vLLM's own server: top_p is in (0, 1]. 0 is refused, never silently run as 1.0
    # (temperature 0 is how to ask for greedy decoding).
    top_p = check.number("top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise InvalidInput(
            "top_p must be greater than 0 and at most 1 (use temperature 0 for greedy decoding)",
            param="top_p",
            code="invalid_value",
        )
    return top_p


def _logprobs(check: _Check, endpoint: str) -> int | None:
    """Chat: logprobs true (+ top_logprobs 0-20); completions: logprobs 0-5 alternatives."""
    body = check.body
    if endpoint == COMPLETIONS:
        value = body.get("logprobs")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(
                f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
                param="logprobs",
                code="invalid_value",
            )
        top = check.integer("logprobs", 0, 0, MAX_COMPLETION_LOGPROBS)
        check.need("logprobs")
        return top
    wanted = check.flag("logprobs")
    top = check.integer("top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if body.get("top_logprobs") is not None and not wanted:
        raise InvalidInput(
            "top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value"
        )
    if not wanted:
        return None
    check.need("logprobs")
    return top


def _response_format(check: _Check) -> tuple[bool, str | None]:
    """(json_object, json_schema text) of response_format; text is the default."""
    fmt = check.body.get("response_format")
    if fmt is None:
        return False, None
    name = "response_format"
    if not isinstance(fmt, dict):
        raise InvalidInput(f"{name} must be an object", param=name, code="invalid_value")
    kind = fmt.get("type")
    if kind == "text":
        return False, None
    if kind == "json_object":
        check.need(name)
        return True, None
    if kind != "json_schema":
        raise InvalidInput(
            f"{name}.type must be one of text, json_object, json_schema",
            param=f"{name}.type",
            code="invalid_value",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidInput(
            f"{name}.json_schema must be an object with name and schema",
            param=f"{name}.json_schema",
            code="invalid_value",
        )
    label = spec.get("name")
    if not isinstance(label, str) or not SCHEMA_NAME.match(label):
        raise InvalidInput(
            f"{name}.json_schema.name must be 1-64 letters, digits, _ or -",
            param=f"{name}.json_schema.name",
            code="invalid_value",
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidInput(
            f"{name}.json_schema.schema must be a JSON Schema object",
            param=f"{name}.json_schema.schema",
            code="invalid_value",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidInput(
            f"{name}.json_schema.strict must be true or false",
            param=f"{name}.json_schema.strict",
            code="invalid_value",
        )
    # strict or not, the engine's grammar enforces the schema (stricter than best effort).
    check.need(name)
    return False, json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _no_tools(body: dict[str, Any]) -> None:
    # Tool calling would need the model's tool-call parser; nothing here parses tool calls,
    # so a tool request is refused rather than answered with plain text.
    for name in ("tools", "functions"):
        if body.get(name):
            raise InvalidInput(
                f"{name} (function calling) is not supported; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise InvalidInput(
                f"{name} is not supported (no tools can be called)",
                param=name,
                code="unsupported_parameter",
            )
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise InvalidInput(
            "parallel_tool_calls must be true or false",
            param="parallel_tool_calls",
            code="invalid_value",
        )


def _identity(body: dict[str, Any]) -> None:
    """user and metadata: labels that never change the output, checked for shape."""
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 512):
        raise InvalidInput(
            "user must be a string of up to 512 characters", param="user", code="invalid_value"
        )
    meta = body.get("metadata")
    if meta is None:
        return
    if (
        not isinstance(meta, dict)
        or len(meta) > MAX_METADATA
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in meta.items()
        )
    ):
        raise InvalidInput(
            f"metadata must be an object of up to {MAX_METADATA} string pairs "
            "(keys up to 64 characters, values up to 512)",
            param="metadata",
            code="invalid_value",
        )


def _refuse_unused(body: dict[str, Any]) -> None:
    """Known fields whose non-default value nothing here can honour."""
    refused: dict[str, Callable[[Any], bool]] = {
        "logit_bias": lambda v: bool(v),
        "echo": lambda v: v is True,
        "best_of": lambda v: v not in (None, 1),
        "suffix": lambda v: v not in (None, ""),
        "audio": lambda v: v is not None,
        "prediction": lambda v: v is not None,
        "web_search_options": lambda v: v is not None,
        "reasoning_effort": lambda v: v is not None,
        "modalities": lambda v: v not in (None, ["text"]),
        "store": lambda v: v is True,
    }
    for name, used in refused.items():
        if name in body and used(body[name]):
            raise InvalidInput(
                f"{name} is not supported by this service; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    # One tier here: "auto"/"default" mean it; flex or priority processing would be ignored.
    if body.get("service_tier") not in (None, "auto", "default"):
        raise InvalidInput(
            "service_tier must be auto or default (one tier here)",
            param="service_tier",
            code="unsupported_parameter",
        )


def parse_sampling(
    body: dict[str, Any],
    max_tokens_limit: int | None = None,
    *,
    endpoint: str = CHAT,
    engine: str | None = None,
    allow_stream: bool = False,
) -> Sampling:
    """Check the sampling fields of a body; raises InvalidInput naming the field.

    engine: the served engine's name; its optional fields (sluice.capabilities) are honoured,
    the others refused. None checks shapes only (every optional field allowed).
    """
    check = _Check(body, engine)
    n = check.integer("n", 1, 1, MAX_N)
    if n > 1:
        check.need("n")
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise InvalidInput("stream must be true or false", param="stream", code="invalid_value")
    if body.get("stream") and not allow_stream:
        raise InvalidInput(
            "stream is not supported in batches", param="stream", code="invalid_value"
        )
    if body.get("stream_options") is not None and not (
        allow_stream and isinstance(body["stream_options"], dict)
    ):
        raise InvalidInput(
            "stream_options is only for streaming requests",
            param="stream_options",
            code="invalid_value",
        )
    _no_tools(body)
    _identity(body)
    _refuse_unused(body)
    top_k = check.integer("top_k", 0, -1, 2**31 - 1)
    if top_k > 0:
        check.need("top_k")
    min_p = check.number("min_p", 0.0, 0.0, 1.0)
    if min_p > 0:
        check.need("min_p")
    repetition = check.number("repetition_penalty", 1.0, 0.0, 2.0)
    if repetition <= 0.0:
        raise InvalidInput(
            "repetition_penalty must be greater than 0 and at most 2",
            param="repetition_penalty",
            code="invalid_value",
        )
    if repetition != 1.0:
        check.need("repetition_penalty")
    presence = check.number("presence_penalty", 0.0, -2.0, 2.0)
    if presence != 0.0:
        check.need("presence_penalty")
    frequency = check.number("frequency_penalty", 0.0, -2.0, 2.0)
    if frequency != 0.0:
        check.need("frequency_penalty")
    ignore_eos = check.flag("ignore_eos")
    if ignore_eos:
        check.need("ignore_eos")
    json_object, json_schema = _response_format(check)
    logprobs = _logprobs(check, endpoint)
    if logprobs is not None and body.get("stream"):
        # Streamed chunks carry text only; logprobs would be silently dropped.
        raise InvalidInput(
            "logprobs is not supported with stream: true (send stream: false)",
            param="logprobs",
            code="unsupported_parameter",
        )
    return Sampling(
        max_tokens=_max_tokens(body, max_tokens_limit),
        temperature=check.number("temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(check),
        stop=_stop(body),
        seed=_seed(check),
        presence_penalty=presence,
        frequency_penalty=frequency,
        ignore_eos=ignore_eos,
        n=n,
        top_k=max(0, top_k),
        min_p=min_p,
        repetition_penalty=repetition,
        logprobs=logprobs,
        json_object=json_object,
        json_schema=json_schema,
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


def _unknown(body: dict[str, Any], known: frozenset[str], endpoint: str) -> None:
    for name in body:
        if name not in known:
            raise InvalidInput(
                f"unrecognized request argument {name!r} for {endpoint}",
                param=str(name),
                code="unknown_parameter",
            )


def _response_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """/v1/responses input (a string, or messages with text parts) as chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidInput(
                "instructions must be a string", param="instructions", code="invalid_value"
            )
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if raw is None:
        raise InvalidInput(
            "input is required for /v1/responses",
            param="input",
            code="missing_required_parameter",
        )
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise InvalidInput(
            "input must be a string or a non-empty list of messages",
            param="input",
            code="invalid_value",
        )
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise InvalidInput(
                f"{where} must be a message (other input items are not supported)",
                param=where,
                code="invalid_value",
            )
        role, content = item.get("role"), item.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidInput(
                f"{where}.role must be one of system, developer, user, assistant",
                param=f"{where}.role",
                code="invalid_value",
            )
        if isinstance(content, list):
            if not all(
                isinstance(p, dict)
                and p.get("type") in ("input_text", "output_text")
                and isinstance(p.get("text"), str)
                for p in content
            ):
                raise InvalidInput(
                    f"{where}.content parts must be input_text or output_text parts",
                    param=f"{where}.content",
                    code="invalid_value",
                )
            content = "".join(p["text"] for p in content)
        elif not isinstance(content, str):
            raise InvalidInput(
                f"{where}.content must be a string or a list of text parts",
                param=f"{where}.content",
                code="invalid_value",
            )
        messages.append({"role": role, "content": content})
    return messages


def _response_format_of_text(body: dict[str, Any]) -> dict[str, Any] | None:
    """Responses' text.format (flat json_schema) as chat's response_format."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise InvalidInput("text must be an object with format", param="text", code="invalid_value")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidInput(
            "text.format must be an object", param="text.format", code="invalid_value"
        )
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}


def responses_as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A /v1/responses body as the chat body it runs as (fields renamed, refusals checked)."""
    unsupported: tuple[tuple[str, Callable[[Any], bool]], ...] = (
        ("previous_response_id", lambda v: v is not None),
        ("background", lambda v: v is True),
        ("reasoning", lambda v: v is not None),
        ("truncation", lambda v: v not in (None, "disabled")),
    )
    for name, used in unsupported:
        if name in body and used(body[name]):
            raise InvalidInput(
                f"{name} is not supported for /v1/responses here; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    chat: dict[str, Any] = {"messages": _response_input(body)}
    for src, dst in (
        ("model", "model"),
        ("max_output_tokens", "max_completion_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("metadata", "metadata"),
        ("user", "user"),
        ("store", "store"),
        ("stream", "stream"),
        ("service_tier", "service_tier"),
        *((t, t) for t in _TOOLS),
    ):
        if body.get(src) is not None:
            chat[dst] = body[src]
    fmt = _response_format_of_text(body)
    if fmt is not None:
        chat["response_format"] = fmt
    if _logprobs_included(body) or body.get("top_logprobs") is not None:
        chat["logprobs"] = True
        if body.get("top_logprobs") is not None:
            chat["top_logprobs"] = body["top_logprobs"]
    return chat


def _logprobs_included(body: dict[str, Any]) -> bool:
    """Whether `include` asks for output logprobs (the one include served here)."""
    include = body.get("include")
    if include is None:
        return False
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise InvalidInput(
            "include must be a list of strings", param="include", code="invalid_value"
        )
    other = sorted(set(include) - {RESPONSE_LOGPROBS})
    if other:
        raise InvalidInput(
            f"include {other[0]!r} is not supported here (only {RESPONSE_LOGPROBS!r})",
            param="include",
            code="unsupported_parameter",
        )
    return RESPONSE_LOGPROBS in include


def _rename_param(exc: InvalidInput, old: str, new: str) -> InvalidInput:
    if exc.param is None or not exc.param.startswith(old):
        return exc
    param = new + exc.param[len(old) :]
    return InvalidInput(exc.message.replace(exc.param, param), param=param, code=exc.code)


def parse_body(
    endpoint: str,
    body: Any,
    *,
    max_tokens_limit: int | None = None,
    check_nul: bool = False,
    engine: str | None = None,
    allow_stream: bool = False,
) -> ParsedBody:
    """Check a chat, completions, responses or embeddings body; InvalidInput names the field.

    At entry (the API) pass the model's max_tokens_limit, check_nul (PostgreSQL text cannot
    hold NUL, and a prompt holding one is never what a client meant) and the served engine's
    name (its capabilities decide which optional fields are honoured or refused).
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
        _unknown(body, CHAT_FIELDS, endpoint)
        messages = _messages(body)
    elif endpoint == COMPLETIONS:
        _unknown(body, COMPLETION_FIELDS, endpoint)
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
    elif endpoint == RESPONSES:
        _unknown(body, RESPONSE_FIELDS, endpoint)
        body = responses_as_chat(body)
        messages = body["messages"]
        try:
            sampling = parse_sampling(
                body, max_tokens_limit, endpoint=CHAT, engine=engine, allow_stream=allow_stream
            )
        except InvalidInput as exc:
            exc = _rename_param(exc, "max_completion_tokens", "max_output_tokens")
            exc = _rename_param(exc, "logprobs", "include")  # an engine without logprobs
            raise _rename_param(exc, "response_format", "text.format") from None
        return ParsedBody(model=model, prompt=None, messages=messages, sampling=sampling)
    elif endpoint == EMBEDDINGS:
        _unknown(body, EMBEDDING_FIELDS, endpoint)
        _identity(body)  # user, checked as on every endpoint
        embed = parse_embedding_body(body)
        return ParsedBody(
            model=model, prompt=None, messages=None, sampling=NO_SAMPLING, embed=embed
        )
    else:
        raise InvalidInput(
            f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint", code="invalid_url"
        )
    return ParsedBody(
        model=model,
        prompt=prompt,
        messages=messages,
        sampling=parse_sampling(
            body, max_tokens_limit, endpoint=endpoint, engine=engine, allow_stream=allow_stream
        ),
    )
