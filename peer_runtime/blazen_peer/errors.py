"""Server-side status errors, shared by the engine and both transports (which map them to gRPC / HTTP)."""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """gRPC status names; ``http`` is the status the HTTP/JSON shim answers with."""

    INVALID_ARGUMENT = 400
    UNAUTHENTICATED = 401
    PERMISSION_DENIED = 403
    NOT_FOUND = 404
    FAILED_PRECONDITION = 412
    OUT_OF_RANGE = 413
    RESOURCE_EXHAUSTED = 429
    INTERNAL = 500
    UNIMPLEMENTED = 501
    UNAVAILABLE = 503
    DEADLINE_EXCEEDED = 504

    @property
    def http(self) -> int:
        return self.value


class PeerStatusError(Exception):
    """A request failed before (or instead of) running: the transport answers with ``status`` and
    ``message``."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"PeerStatusError({self.status.name}, {self.message!r})"


def exception_text(exc: BaseException) -> str:
    """What a failure message says of ``exc``: its text, led by its class name when the text is empty or
    ``exc`` is not an ``Exception`` (``SystemExit: 3``, ``KeyboardInterrupt``)."""
    text = str(exc)
    if isinstance(exc, Exception) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
