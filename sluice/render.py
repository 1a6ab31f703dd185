"""OpenAI wire shapes: File, Batch and job objects, and batch output/error lines, streamed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sluice.db import Database
from sluice.embeddings import embedding_body
from sluice.models import CANCELLED, EXPIRED, FAILED, SUCCEEDED, TERMINAL_REQUEST
from sluice.sampling import CHAT, EMBEDDINGS, RESPONSES
from sluice.store.files import PAGE, input_line_pages, record_bytes, request_pages

Row = Mapping[Any, Any]

ERROR_STATUSES = (FAILED, CANCELLED, EXPIRED)
# Failures that are the service's fault rather than the request's.
SERVER_ERROR_CODES = frozenset({"max_attempts_exceeded", "engine_error", "internal_error"})
DROPPED_MESSAGES = {
    CANCELLED: "The batch was cancelled before this request ran.",
    EXPIRED: "This request could not be executed before the completion window expired.",
}


def dumps(obj: Any) -> bytes:
    """One compact JSON line (UTF-8, no trailing newline)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    # An engine may emit a lone surrogate; never let one line break the whole download.
    return text.encode("utf-8", "replace")


def file_object(row: Row) -> dict[str, Any]:
    """OpenAI's File object (bytes must already be known)."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": int(row["bytes"] or 0),
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "expires_at": row["expires_at"],
        "status": "processed",
        "status_details": None,
    }


def batch_object(row: Row) -> dict[str, Any]:
    """OpenAI's Batch object, every field."""
    errors = json.loads(row["errors_json"]) if row["errors_json"] else None
    input_tokens, output_tokens = int(row["input_tokens"]), int(row["output_tokens"])
    cached_tokens = int(row["cached_tokens"] or 0)
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"] or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {
            "total": row["total"],
            "completed": row["completed"],
            "failed": row["failed"],
        },
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        "metadata": json.loads(row["metadata_json"]) if row["metadata_json"] else None,
    }


def _usage(req: Row) -> dict[str, Any]:
    prompt, completion = int(req["prompt_tokens"] or 0), int(req["completion_tokens"] or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": int(req["cached_tokens"] or 0)},
    }


def _stored_choices(req: Row) -> list[dict[str, Any]]:
    """The request's choices: from choices_json (n > 1 or logprobs), else its one output."""
    raw = req.get("choices_json")
    if raw:
        return list(json.loads(raw))
    return [{"text": req["output_text"] or "", "finish_reason": req["finish_reason"]}]


def _token_logprobs(tokens: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's per-token entries [{token, logprob, bytes, top_logprobs}] (chat, responses)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return [
        {**entry(tok, lp), "top_logprobs": [entry(t, p) for t, p in top]} for tok, lp, top in tokens
    ]


def _chat_logprobs(tokens: list[Any] | None) -> dict[str, Any] | None:
    """OpenAI's chat logprobs: {content: per-token entries, refusal}."""
    if tokens is None:
        return None
    return {"content": _token_logprobs(tokens), "refusal": None}


def _completion_logprobs(tokens: list[Any] | None) -> dict[str, Any] | None:
    """OpenAI's (legacy) completions logprobs: parallel lists and text offsets."""
    if tokens is None:
        return None
    offsets, at = [], 0
    for tok, _, _ in tokens:
        offsets.append(at)
        at += len(tok)
    return {
        "tokens": [tok for tok, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [dict(top) for _, _, top in tokens],
        "text_offset": offsets,
    }


def completion_body(req: Row) -> dict[str, Any]:
    """The chat.completion, text_completion, response or embeddings list of a succeeded
    request."""
    if req["endpoint"] == EMBEDDINGS:
        return embedding_body(req)
    created = int(req["finished_at"] or 0)
    choices = _stored_choices(req)
    if req["endpoint"] == RESPONSES:
        return response_body(req, choices[0])
    if req["endpoint"] == CHAT:
        return {
            "id": f"chatcmpl-{req['id']}",
            "object": "chat.completion",
            "created": created,
            "model": req["model"],
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c["text"], "refusal": None},
                    "finish_reason": c["finish_reason"],
                    "logprobs": _chat_logprobs(c.get("logprobs")),
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(req),
            "system_fingerprint": None,
        }
    return {
        "id": f"cmpl-{req['id']}",
        "object": "text_completion",
        "created": created,
        "model": req["model"],
        "choices": [
            {
                "index": i,
                "text": c["text"],
                "finish_reason": c["finish_reason"],
                "logprobs": _completion_logprobs(c.get("logprobs")),
            }
            for i, c in enumerate(choices)
        ],
        "usage": _usage(req),
    }


def response_body(req: Row, choice: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's Response object (/v1/responses) for text output."""
    prompt, completion = int(req["prompt_tokens"] or 0), int(req["completion_tokens"] or 0)
    cut = choice["finish_reason"] == "length"
    return {
        "id": f"resp_{req['id']}",
        "object": "response",
        "created_at": int(req["finished_at"] or 0),
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "model": req["model"],
        "output": [
            {
                "type": "message",
                "id": f"msg_{req['id']}",
                "status": "incomplete" if cut else "completed",
                "role": "assistant",
                "content": [_output_text(choice)],
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            # cache_write_tokens: OpenAI bills cache writes; nothing here does.
            "input_tokens_details": {
                "cached_tokens": int(req["cached_tokens"] or 0),
                "cache_write_tokens": 0,
            },
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }


def _output_text(choice: dict[str, Any]) -> dict[str, Any]:
    """A Response's output_text part, with its token logprobs when they were asked for."""
    part: dict[str, Any] = {"type": "output_text", "text": choice["text"], "annotations": []}
    if choice.get("logprobs") is not None:
        part["logprobs"] = _token_logprobs(choice["logprobs"])
    return part


def result_line(req: Row) -> dict[str, Any]:
    """A finished request as one line of a batch output or error file."""
    line: dict[str, Any] = {"id": f"batch_req_{req['id']}", "custom_id": req["custom_id"]}
    status = req["status"]
    if status == SUCCEEDED:
        line["response"] = {
            "status_code": 200,
            "request_id": f"req_{req['id']}",
            "body": completion_body(req),
        }
        line["error"] = None
    elif status == FAILED:
        code = req["error_code"] or "request_failed"
        server = code in SERVER_ERROR_CODES
        line["response"] = {
            "status_code": 500 if server else 400,
            "request_id": f"req_{req['id']}",
            "body": {
                "error": {
                    "message": req["error_message"] or "the request failed",
                    "type": "server_error" if server else "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            },
        }
        line["error"] = None
    else:
        default = "batch_cancelled" if status == CANCELLED else "batch_expired"
        line["response"] = None
        line["error"] = {
            "code": req["error_code"] or default,
            "message": req["error_message"] or DROPPED_MESSAGES.get(status, "not run"),
        }
    return line


def _line_chunks(pages: Iterable[Sequence[Row]]) -> Iterator[bytes]:
    # One chunk per page: few thread hops for a streamed response, bounded memory.
    for page in pages:
        yield b"".join(dumps(result_line(r)) + b"\n" for r in page)


def output_chunks(db: Database, batch_id: str, purpose: str, page: int = PAGE) -> Iterator[bytes]:
    """A batch's output file (succeeded requests) or error file (the rest), by line number."""
    statuses = (SUCCEEDED,) if purpose == "batch_output" else ERROR_STATUSES
    return _line_chunks(request_pages(db, batch_id, statuses, page=page))


def results_chunks(
    db: Database, batch_id: str, after_line: int | None = None, page: int = PAGE
) -> Iterator[bytes]:
    """Every request of a batch finished so far, in output line format, by line number."""
    return _line_chunks(request_pages(db, batch_id, TERMINAL_REQUEST, after_line, page))


def input_chunks(
    db: Database, file_id: str, page: int = PAGE, size: int | None = None
) -> Iterator[bytes]:
    """An uploaded file's bytes as uploaded (CRLF kept; a final newline only if it had one).

    Lines are stored without their "\n": each page goes out with its last newline held back,
    and the file's last one is written only when the upload's size says it was there. A line
    kept without text (not UTF-8, NUL, over the line limit) comes back empty.
    """
    sent = 0
    held = b""
    for lines in input_line_pages(db, file_id, page):
        chunk = held + b"\n".join((raw or "").encode("utf-8") for raw in lines)
        sent += len(chunk)
        held = b"\n"
        yield chunk
    if held and (size is None or sent < size):
        yield held


def file_chunks(db: Database, file: Row, page: int = PAGE) -> Iterator[bytes]:
    """A file's content, whatever its purpose."""
    if file["purpose"] in ("batch_output", "batch_error") and file["batch_id"]:
        return output_chunks(db, file["batch_id"], file["purpose"], page)
    size = file["bytes"]
    return input_chunks(db, file["id"], page, None if size is None else int(size))


def measured_bytes(db: Database, file: Row) -> int:
    """A file's size; a rendered file is measured once by rendering it, then remembered."""
    if file["bytes"] is not None:
        return int(file["bytes"])
    size = sum(len(chunk) for chunk in file_chunks(db, file))
    record_bytes(db, file["id"], size)
    return size


def job_object(batch: Row, req: Row | None) -> dict[str, Any]:
    """A single job: its request's status, output, usage, error and timings."""
    status = req["status"] if req is not None else "queued"
    queued = req["queued_at"] if req is not None else None
    started = req["started_at"] if req is not None else None
    finished = req["finished_at"] if req is not None else None
    error = None
    if req is not None and status in ERROR_STATUSES:
        error = {
            "code": req["error_code"],
            "message": req["error_message"] or DROPPED_MESSAGES.get(status, "the job failed"),
        }
    return {
        "id": batch["id"],
        "object": "job",
        "status": status,
        "model": batch["model"],
        "endpoint": batch["endpoint"],
        "output": req["output_text"] if req is not None else None,
        "finish_reason": req["finish_reason"] if req is not None else None,
        "usage": _usage(req) if req is not None and status in (SUCCEEDED, FAILED) else None,
        "error": error,
        # The OpenAI body its endpoint answers (chat.completion or text_completion), as the
        # online endpoints and batch output lines carry it.
        "response": completion_body(req) if req is not None and status == SUCCEEDED else None,
        "created_at": batch["created_at"],
        "timings": {
            "queued_at": queued,
            "started_at": started,
            "finished_at": finished,
            "queue_seconds": _delta(queued, started),
            "run_seconds": _delta(started, finished),
        },
    }


def _delta(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 6)
