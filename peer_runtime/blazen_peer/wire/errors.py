"""The runtime's one error hierarchy: every error the peer runtime (server, client, TLS loading) raises on
purpose derives from ``PeerError``, so one ``except PeerError`` covers them all.

``Status`` is the protocol's status vocabulary (gRPC names, with the HTTP status the shim answers with);
``PeerStatusError`` is a call that ends with one of them, raised by the engine or the admission and mapped to
a gRPC status or an HTTP answer by the transports. Messages are safe to send to the caller (never a secret).
This module imports nothing of the runtime, so the client uses it as well as the server.
"""

from __future__ import annotations

import enum

__all__ = [
    "DrainingError",
    "EntrypointError",
    "PeerAuthConfigError",
    "PeerError",
    "PeerInsecureConfigError",
    "PeerStatusError",
    "PeerTlsError",
    "Status",
    "exception_text",
]


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


class PeerError(Exception):
    """Base class of every error raised on purpose by the peer runtime."""


class PeerStatusError(PeerError):
    """A request failed before (or instead of) running: the transport answers with ``status`` and
    ``message``."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status.name}, {self.message!r})"


def exception_text(exc: BaseException) -> str:
    """What a failure message says of ``exc``: its text, led by its class name when the text is empty or
    ``exc`` is not an ``Exception`` (``SystemExit: 3``, ``KeyboardInterrupt``)."""
    text = str(exc)
    if isinstance(exc, Exception) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DrainingError(PeerStatusError):
    """A call refused because the peer is draining (UNAVAILABLE / 503: retry on another replica)."""

    def __init__(self, message: str) -> None:
        super().__init__(Status.UNAVAILABLE, message)


class PeerTlsError(PeerError):
    """TLS configuration error: unreadable or malformed PEM, key/cert mismatch, broken chain, expired cert."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"TLS configuration error: {detail}")
        self.detail = detail


class PeerAuthConfigError(PeerError):
    """The bearer-token configuration is unusable (unreadable or empty token file at start)."""


class EntrypointError(PeerError):
    """The ``--entrypoint`` module could not be imported, or its registration failed."""


class PeerInsecureConfigError(PeerError):
    """Neither TLS nor a token is configured and ``--insecure`` was not given: the server refuses to start."""
