"""HTTP errors: every failure answers in OpenAI's error shape, naming the field or line."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sluice.errors import Conflict, InvalidInput, NotFound, TooLarge

log = logging.getLogger("sluice.api")

# pydantic error types -> OpenAI-style codes
_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "json_invalid": "invalid_json",
}


class ApiError(Exception):
    """An HTTP error raised by a route: status, message, and what it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        line: int | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.line = line
        self.type = type_


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    line: int | None = None,
    type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error body shaped as OpenAI's."""
    body = {"message": message, "type": type_, "param": param, "code": code, "line": line}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _param(loc: Sequence[Any]) -> str | None:
    # ("body", "messages", 0, "role") -> "messages.0.role"; ("query", "wait") -> "wait"
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """The first problem names the field; the message lists every problem."""
    errors = list(exc.errors())
    if not errors:
        return error_response(400, "invalid request", code="invalid_request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error_response(
            400, f"the request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json"
        )
    messages = []
    for err in errors:
        where = _param(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if where is None and err.get("type") == "missing":
            msg = "a JSON request body is required"
        elif tuple(err.get("loc", ())) == ("body",):
            msg = f"the request body must be a JSON object ({msg})"
        messages.append(f"{where}: {msg}" if where else msg)
    return error_response(
        400,
        "; ".join(messages),
        code=_CODES.get(str(first.get("type")), "invalid_value"),
        param=_param(first.get("loc", ())),
    )


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.message,
        code=exc.code,
        param=exc.param,
        line=exc.line,
        type_=exc.type,
        headers=exc.headers,
    )


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidInput)
    return error_response(400, exc.message, code=exc.code, param=exc.param, line=exc.line)


async def _not_found(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFound)
    return error_response(404, str(exc), code=f"{exc.kind}_not_found")


async def _conflict(_: Request, exc: Exception) -> JSONResponse:
    return error_response(409, str(exc), code="conflict")


async def _too_large(_: Request, exc: Exception) -> JSONResponse:
    # The client may still be sending: tell it not to reuse this connection.
    return error_response(
        413, str(exc), code="file_too_large", param="file", headers={"Connection": "close"}
    )


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_response(exc)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        exc.status_code
    )
    return error_response(
        exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}) or None
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn exceptions into OpenAI-shaped errors."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(InvalidInput, _invalid)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_exception_handler(TooLarge, _too_large)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    # No handler for Exception: Starlette's re-raises after answering, which closes the
    # connection; api.guard answers every other error (503 for outages, else 500).
