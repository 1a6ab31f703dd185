"""The validator: turn a claimed row into an engine request, or into its own failure."""

from __future__ import annotations

import orjson

from sluice.errors import InvalidInput, RequestRejected
from sluice.ids import now
from sluice.sampling import CHAT, message_text, parse_body
from sluice.store.work import Claimed, Result
from worker.engines.base import Engine, GenRequest


def to_gen_request(claimed: Claimed, engine: Engine) -> GenRequest:
    """Render the prompt and check it fits; raises RequestRejected for this request only."""
    try:
        body = orjson.loads(claimed.body)
        if claimed.from_file:
            body = body["body"]
        parsed = parse_body(claimed.endpoint, body)
    except (ValueError, KeyError, TypeError) as exc:
        raise RequestRejected("invalid_body", f"the stored body cannot be read: {exc}") from None
    except InvalidInput as exc:
        raise RequestRejected(exc.code, exc.message) from None
    if claimed.endpoint == CHAT:
        assert parsed.messages is not None
        messages = [{**m, "content": message_text(m.get("content"))} for m in parsed.messages]
        prompt = engine.render_chat(messages)
    else:
        assert parsed.prompt is not None
        prompt = parsed.prompt
    n_prompt = engine.count_tokens(prompt)
    limit = engine.max_model_len
    if n_prompt + parsed.sampling.max_tokens > limit:
        raise RequestRejected(
            "context_length_exceeded",
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + parsed.sampling.max_tokens} tokens ({n_prompt} in the prompt, "
            f"{parsed.sampling.max_tokens} in the completion). Please reduce the length of "
            "the prompt or max_tokens.",
        )
    return GenRequest(
        id=claimed.id, prompt=prompt, sampling=parsed.sampling, priority=claimed.priority
    )


def rejected_result(claimed_id: int, exc: RequestRejected) -> Result:
    """The stored failure of a request that never reached the engine."""
    return Result(
        id=claimed_id,
        status="failed",
        error_code=exc.code,
        error_message=exc.message,
        finished_at=now(),
    )
