"""Typed client errors (the set Blazen's SDK pages list), all under one base, ``PeerError``.

``PeerError`` and ``PeerTlsError`` come from the runtime's one hierarchy (``blazen_peer.wire.errors``), so one
``except PeerError`` covers client, TLS-loading and server-side errors alike.
"""

from __future__ import annotations

import os

from ..wire.errors import PeerError, PeerTlsError
from ..wire.protocol import ENVELOPE_VERSION, TOKEN_ENV


class _Coded(PeerError):
    """``code``: the gRPC status name (``"NOT_FOUND"``) or ``"HTTP 404"``; None for local failures."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class PeerUnknownStepError(_Coded):
    """The peer does not serve one of the requested step ids."""


class PeerEnvelopeVersionError(_Coded):
    """Client and server speak incompatible envelope versions."""


class PeerWorkflowError(_Coded):
    """The workflow could not be built or run, or (with ``raise_on_error=True``) ran and reported an error;
    ``response`` is then the ``SubWorkflowResponse``."""

    def __init__(self, message: str, *, code: str | None = None, response: object = None) -> None:
        super().__init__(message, code=code)
        self.response = response


class PeerTransportError(_Coded):
    """Network-level failure: refused connection, unavailable peer, deadline, TLS handshake, rejected
    credentials."""


class PeerEncodeError(_Coded):
    """A payload could not be encoded or decoded (postcard, JSON, UUID), or exceeded the message limit."""


class PeerSessionRefNotFoundError(_Coded):
    """Deref of a session ref that no replica holds."""


def peer_envelope_version() -> int:
    return ENVELOPE_VERSION


def peer_token_env() -> str:
    return TOKEN_ENV


def resolve_peer_token() -> str | None:
    """``BLAZEN_PEER_TOKEN`` when set and non-empty, else None."""
    token = os.environ.get(TOKEN_ENV)
    return token or None


def error_for_status(code: str, message: str, method: str) -> PeerError:
    """Map a status (gRPC name) of a failed call to the typed error. ``method``: invoke, stream, deref,
    release."""
    if code == "NOT_FOUND":
        if method in ("deref", "release"):
            return PeerSessionRefNotFoundError(message, code=code)
        return PeerUnknownStepError(message, code=code)
    if code == "FAILED_PRECONDITION":
        return PeerEnvelopeVersionError(message, code=code)
    if code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED") or message.startswith(
        "failed to decode Protobuf"
    ):
        if code == "RESOURCE_EXHAUSTED" and "larger than max" not in message:
            return PeerTransportError(message, code=code)
        return PeerEncodeError(message, code=code)
    if code == "INTERNAL":
        return PeerWorkflowError(message, code=code)
    return PeerTransportError(message, code=code)


_HTTP_TO_CODE = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    409: "FAILED_PRECONDITION",
    412: "FAILED_PRECONDITION",
    413: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
}


def error_for_http(status: int, message: str, method: str) -> PeerError:
    err = error_for_status(_HTTP_TO_CODE.get(status, "UNAVAILABLE"), message, method)
    err.code = f"HTTP {status}"  # type: ignore[attr-defined]
    return err


__all__ = [
    "TOKEN_ENV",
    "PeerEncodeError",
    "PeerEnvelopeVersionError",
    "PeerError",
    "PeerSessionRefNotFoundError",
    "PeerTlsError",
    "PeerTransportError",
    "PeerUnknownStepError",
    "PeerWorkflowError",
    "error_for_http",
    "error_for_status",
    "peer_envelope_version",
    "peer_token_env",
    "resolve_peer_token",
]
