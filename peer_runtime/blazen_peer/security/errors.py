"""Typed errors raised by the security building blocks.

``PeerError`` is the common base of every error the peer runtime raises on purpose. The core runtime may
define its own typed errors elsewhere; it should derive them from this base (or re-export it) so that
callers can catch one class. ``PeerRejected`` carries the status a transport answers with: the gRPC
status code and the HTTP status, plus a message that is safe to send to the caller (it never contains a
secret).
"""

from __future__ import annotations

import grpc

__all__ = [
    "DrainingError",
    "LimitExceededError",
    "PeerAuthConfigError",
    "PeerError",
    "PeerInsecureConfigError",
    "PeerRejected",
    "PeerTlsError",
    "UnauthenticatedError",
]


class PeerError(Exception):
    """Base class of every error raised on purpose by the peer runtime."""


class PeerTlsError(PeerError):
    """TLS configuration error: unreadable or malformed PEM, key/cert mismatch, broken chain, expired cert."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"TLS configuration error: {detail}")
        self.detail = detail


class PeerAuthConfigError(PeerError):
    """The bearer-token configuration is unusable (unreadable or empty token file at start)."""


class PeerInsecureConfigError(PeerError):
    """Neither TLS nor a token is configured and ``--insecure`` was not given: the server refuses to start."""


class PeerRejected(PeerError):
    """A call refused before it reached the engine; transports map it to a status."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnauthenticatedError(PeerRejected):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class DrainingError(PeerRejected):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class LimitExceededError(PeerRejected):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
