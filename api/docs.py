"""OpenAPI documentation of error answers: every route lists the statuses it can give."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    """OpenAI's error object, plus the line of a batch file it is about."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    line: int | None = None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer's body."""

    error: ErrorDetail


def _doc(description: str, retry_after: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry_after:
        doc["headers"] = {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        }
    return doc


# Statuses any route may answer (bad parameters, an outage).
COMMON: dict[int | str, dict[str, Any]] = {
    400: _doc("A parameter or body field is wrong (`param` names it)"),
    413: _doc("The request body is over its configured size"),
    503: _doc("The database or Redis is unavailable", retry_after=True),
}
# Every route but the probes (api/auth.py): the app documents these on all of them.
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _doc("No API key, or a wrong, revoked or expired one"),
    429: _doc("Over a limit of the key (requests per minute, queued, stored)", retry_after=True),
}
# Routes over every owner's data.
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON,
    403: _doc("The key is not an admin key"),
}
# Routes about one resource (an id in the path).
ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON,
    404: _doc("No such file, batch or job"),
    409: _doc("The resource's state does not allow this"),
}
# Routes that queue work.
SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    429: _doc("Too much work is queued already", retry_after=True),
}
