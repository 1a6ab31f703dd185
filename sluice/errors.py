"""One hierarchy for every error Sluice raises outside HTTP."""

from __future__ import annotations


class SluiceError(Exception):
    """Base of every Sluice error."""


class ConfigError(SluiceError):
    """A setting is missing or wrong; raised at start."""


class StartFailed(SluiceError):
    """A process `sluice up` or `sluice run` started did not come up (it exited, or timed out)."""


class NotFound(SluiceError):
    """A file, batch or job does not exist (or belongs to someone else)."""

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"no {kind} with id {ident!r}")
        self.kind = kind
        self.ident = ident


class InvalidInput(SluiceError):
    """Client input is wrong; says which field or line."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        line: int | None = None,
        code: str = "invalid_request",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.line = line
        self.code = code


class Conflict(SluiceError):
    """The request clashes with the resource's state (e.g. cancel a finished batch)."""


class TooLarge(SluiceError):
    """An upload exceeds a configured size limit."""


class RequestRejected(SluiceError):
    """A request cannot run on this model (too long, bad params); fails alone."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
