"""Bearer-token authentication: the token source, the per-call check, a gRPC interceptor, an aiohttp
middleware.

The token comes from ``--token-file`` (re-read when the file changes, so a rotated Secret takes effect
without a restart) or from ``BLAZEN_PEER_TOKEN``; surrounding whitespace is stripped. Callers send
``authorization: Bearer <token>`` (gRPC metadata or HTTP header), the convention Blazen's control plane
uses; the comparison is constant-time (``hmac.compare_digest``).

After a rotation the previous token is still accepted for ``rotation_grace`` seconds (default 120):
the kubelet updates the Secret in each pod at its own moment (up to about a minute apart), so without
that window siblings would reject each other's forwarded calls in between.

The per-call cost is one ``time.monotonic()``, a split and one or two ``compare_digest``; the file is
stat()ed at most once per ``recheck_interval``. The token is never logged and never part of a message.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from aiohttp import web

from .errors import PeerAuthConfigError

__all__ = [
    "DEFAULT_EXEMPT_METHODS",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "AioTokenAuthInterceptor",
    "TokenAuthInterceptor",
    "TokenSource",
    "make_auth_middleware",
    "rejecting_handler",
]

log = logging.getLogger("blazen_peer.security.auth")

TOKEN_ENV = "BLAZEN_PEER_TOKEN"
TOKEN_FILE_ENV = "BLAZEN_PEER_TOKEN_FILE"
AUTHORIZATION = "authorization"
#: kubelet gRPC probes and grpc-health-probe send no token; health answers reveal nothing.
DEFAULT_EXEMPT_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
MISSING = "missing bearer token (send 'authorization: Bearer <token>')"
INVALID = "invalid bearer token"


def _file_signature(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:
        return (path, "error", e.errno)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


class TokenSource:
    """The current bearer token (and, during a rotation, the previous one)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        recheck_interval: float = 1.0,
        rotation_grace: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token is None) == (token_file is None):
            raise ValueError("give exactly one of token= or token_file=")
        self._file = os.fspath(token_file) if token_file is not None else None
        self._interval = recheck_interval
        self._grace = rotation_grace
        self._clock = clock
        self._lock = threading.Lock()
        self._next_check = clock() + recheck_interval
        self._sig: tuple | None = None
        self.rotation_count = 0
        if self._file is not None:
            self._sig = _file_signature(self._file)
            value = self._read_file()
            if value is None:
                raise PeerAuthConfigError(f"token file {self._file} is unreadable or empty")
        else:
            value = (token or "").strip()
            if not value:
                raise PeerAuthConfigError(f"{TOKEN_ENV} is empty")
        # (current, previous, previous accepted until)
        self._state: tuple[bytes, bytes | None, float] = (value.encode(), None, 0.0)

    @classmethod
    def from_config(
        cls, token_file: str | None = None, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> TokenSource | None:
        """``--token-file`` wins, then ``BLAZEN_PEER_TOKEN_FILE``, then ``BLAZEN_PEER_TOKEN``; None if
        none is set (an empty ``BLAZEN_PEER_TOKEN`` counts as unset, like Blazen's resolver)."""
        env = os.environ if env is None else env
        path = token_file or env.get(TOKEN_FILE_ENV) or None
        if path:
            return cls(token_file=path, **kwargs)
        value = (env.get(TOKEN_ENV) or "").strip()
        if value:
            return cls(token=value, **kwargs)
        return None

    def __repr__(self) -> str:
        return f"TokenSource(file={self._file!r}, rotations={self.rotation_count})"

    # -- reading ---------------------------------------------------------------------------------------
    def _read_file(self) -> str | None:
        assert self._file is not None
        try:
            with open(self._file, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read token file %s: %s", self._file, getattr(e, "strerror", None) or e)
            return None
        return value or None

    def refresh(self) -> bool:
        """Re-read the token file if it changed; True when the token rotated."""
        if self._file is None:
            return False
        with self._lock:
            sig = _file_signature(self._file)
            if sig == self._sig:
                return False
            value = self._read_file()
            if value is None:
                # Half-written or removed: keep the current token (failing closed would lock out everyone,
                # failing open is out of the question). Try again at the next check.
                log.warning("token file %s is empty or unreadable; keeping the current token", self._file)
                return False
            self._sig = sig
            new = value.encode()
            current = self._state[0]
            if hmac.compare_digest(new, current):
                return False
            self._state = (new, current, self._clock() + self._grace)
            self.rotation_count += 1
            log.info("bearer token rotated (previous one accepted for %.0f s)", self._grace)
            return True

    def _maybe_refresh(self) -> None:
        if self._file is not None:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self.refresh()

    # -- checking --------------------------------------------------------------------------------------
    def check_token(self, presented: str | bytes) -> bool:
        self._maybe_refresh()
        if isinstance(presented, str):
            presented = presented.encode()
        current, previous, until = self._state
        ok = hmac.compare_digest(presented, current)
        if previous is not None and self._clock() < until:
            ok = hmac.compare_digest(presented, previous) or ok
        return ok

    def check_bearer(self, header_value: str | bytes | None) -> bool:
        """True when ``header_value`` is ``Bearer <the current token>`` (scheme case-insensitive)."""
        return self.why_rejected(header_value) is None

    def why_rejected(self, header_value: str | bytes | None) -> str | None:
        """None if accepted, else a caller-safe reason (never containing the token)."""
        if not header_value:
            return MISSING
        if isinstance(header_value, bytes):
            header_value = header_value.decode("latin-1")
        scheme, _, presented = header_value.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return MISSING
        return None if self.check_token(presented.strip()) else INVALID

    def check_metadata(self, metadata: Iterable[Any] | None) -> str | None:
        """``why_rejected`` for gRPC invocation metadata."""
        for item in metadata or ():
            if item[0] == AUTHORIZATION:
                return self.why_rejected(item[1])
        return MISSING

    # -- outgoing calls and log redaction --------------------------------------------------------------
    def authorization(self) -> str:
        """``Bearer <token>`` for calls this peer makes (session-ref forwarding to siblings)."""
        self._maybe_refresh()
        return "Bearer " + self._state[0].decode()

    def metadata(self) -> list[tuple[str, str]]:
        return [(AUTHORIZATION, self.authorization())]

    def secrets(self) -> list[str]:
        """The values a log redaction filter must hide."""
        current, previous, _ = self._state
        return [v.decode() for v in (current, previous) if v]


# -- gRPC -------------------------------------------------------------------------------------------


def rejecting_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, *, aio: bool
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``code``/``message`` without running it
    (the request is not even deserialized)."""
    if aio:

        async def behaviour(request_or_iterator: Any, context: Any) -> Any:
            await context.abort(code, message)

    else:

        def behaviour(request_or_iterator: Any, context: Any) -> Any:  # type: ignore[misc]
            context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)


class _AuthBase:
    def __init__(self, tokens: TokenSource, *, exempt_methods: Iterable[str] = DEFAULT_EXEMPT_METHODS):
        self._tokens = tokens
        self._exempt = frozenset(exempt_methods)

    def _reason(self, details: grpc.HandlerCallDetails) -> str | None:
        if details.method in self._exempt:
            return None
        reason = self._tokens.check_metadata(details.invocation_metadata)
        if reason is not None:
            log.info("rejected unauthenticated call to %s: %s", details.method, reason)
        return reason


class AioTokenAuthInterceptor(_AuthBase, grpc.aio.ServerInterceptor):
    """grpc.aio interceptor: UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches."""

    async def intercept_service(self, continuation, handler_call_details):
        reason = self._reason(handler_call_details)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, reason, aio=True)


class TokenAuthInterceptor(_AuthBase, grpc.ServerInterceptor):
    """The same for a synchronous ``grpc.server``."""

    def intercept_service(self, continuation, handler_call_details):
        reason = self._reason(handler_call_details)
        handler = continuation(handler_call_details)
        if reason is None or handler is None:
            return handler
        return rejecting_handler(handler, grpc.StatusCode.UNAUTHENTICATED, reason, aio=False)


# -- aiohttp ----------------------------------------------------------------------------------------


def make_auth_middleware(
    tokens: TokenSource, *, exempt_paths: Sequence[str] = (), realm: str = "blazen-peer"
) -> Callable[..., Any]:
    """aiohttp middleware answering 401 ``{"error": "..."}`` without a valid bearer token.

    ``OPTIONS`` is never checked: browsers send CORS preflights without credentials. Place it inside
    (after) the CORS middleware so that a 401 still carries the CORS headers the browser needs to read it.
    """
    exempt = frozenset(exempt_paths)
    challenge = {"WWW-Authenticate": f'Bearer realm="{realm}"'}

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in exempt:
            return await handler(request)
        reason = tokens.why_rejected(request.headers.get("Authorization"))
        if reason is None:
            return await handler(request)
        log.info("rejected unauthenticated %s %s: %s", request.method, request.path, reason)
        return web.json_response({"error": reason}, status=401, headers=challenge)

    return auth_middleware
