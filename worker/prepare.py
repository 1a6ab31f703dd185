"""The validator: turn a claimed row into an engine request, or into its own failure."""

from __future__ import annotations

import orjson

from sluice.errors import InvalidInput, RequestRejected
from sluice.ids import now
from sluice.sampling import CHAT, message_text, parse_body
from sluice.store.work import Claimed, Result
from worker.engines.base import Engine, GenRequest


def to_gen_request(claimed: Claimed, engine: Engine) -> GenRequest:
    """Render, tokenize once and check the fit; raises RequestRejected for this request only."""
    try:
        body = orjson.loads(claimed.body)
        if claimed.from_file:
            body = body["body"]
        parsed = parse_body(claimed.endpoint, body)
    except (ValueError, KeyError, TypeError) as exc:
        raise RequestRejected("invalid_body", f"the stored body cannot be read: {exc}") from None
    except InvalidInput as exc:
        raise RequestRejected(exc.code, exc.message) from None
    tokenizer = engine.tokenizer
    if claimed.endpoint == CHAT:
        assert parsed.messages is not None
        messages = [{**m, "content": message_text(m.get("content"))} for m in parsed.messages]
        prompt = tokenizer.render_chat(messages)
    else:
        assert parsed.prompt is not None
        prompt = parsed.prompt
    # The only tokenization and the only context check: the engine gets the ids.
    ids = tokenizer.encode(prompt)
    n_prompt, max_tokens = len(ids), parsed.sampling.max_tokens
    if n_prompt == 0:
        raise RequestRejected("invalid_prompt", "the prompt is empty: it has no tokens")
    limit = engine.max_model_len
    if n_prompt + max_tokens > limit:
        raise RequestRejected(
            "context_length_exceeded",
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of "
            "the prompt or max_tokens.",
        )
    return GenRequest(
        id=claimed.id,
        prompt=prompt,
        sampling=parsed.sampling,
        priority=claimed.priority,
        prompt_token_ids=ids,
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
