"""Admission: the one per-call path every BlazenPeer call takes, on every listener and both transports.

``Admission.gate(method)`` gives the pair of functions every call runs through, ``admit`` then ``release``:
drain (UNAVAILABLE / 503 once the drain's admit window is over, except deref/release of the refs this
process holds), bearer token (UNAUTHENTICATED / 401, where the listener checks one), concurrency
(RESOURCE_EXHAUSTED / 429 over ``--max-concurrent-workflows``). The first that refuses answers; a refused
call never holds a slot. ``Admission.grpc_wrapper`` applies the gate to the four gRPC
methods (unary and server-streaming), ``Admission.http_middleware`` to the HTTP/JSON shim; both also bind
the log context (caller node id, request id) and count every answer, refusals included, in the metrics.

The gRPC side is a handler wrapper applied once per method when the server is built, not a grpc.aio
interceptor: grpc.aio runs an interceptor chain as extra coroutines on every call, which shows at
concurrency 32 (docs/benchmarks.md). Everything a call needs is bound when the handler is wrapped.
The gRPC health service and unknown methods are other handlers, never wrapped: kubelet probes carry no
token, and health ``Watch`` streams must not hold the drain open.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from .admin.drain import Drainer
from .admin.logs import bind_log_context, new_request_id, unbind_log_context
from .admin.metrics import CallStats, PeerMetrics, method_label
from .security.auth import TokenSource
from .transport.grpc_server import GRPC_CODES
from .wire.errors import DrainingError, Status
from .wire.protocol import (
    AUTHORIZATION_HEADER,
    AUTHORIZATION_METADATA,
    CONCURRENCY_REFUSED,
    NODE_ID_HEADER,
    NODE_ID_METADATA,
    PATH_DEREF,
    PATH_END_RUN,
    PATH_RELEASE,
    REQUEST_ID_HEADER,
    REQUEST_ID_METADATA,
    ROUTE_DEREF,
    ROUTE_INVOKE,
    ROUTE_RELEASE,
    RPC_NAMES,
)

__all__ = ["LIMITED_METHODS", "Admission", "ConcurrencyLimiter"]

log = logging.getLogger("blazen_peer.admission")

#: the calls ``--max-concurrent-workflows`` counts, on both transports: the four methods. Deref and release
#: count too: each holds a step's payload or forwards to every sibling, so they must not escape the cap.
LIMITED_METHODS = frozenset(RPC_NAMES)

#: deref and release of the session refs this process holds, and a router's end of a split run (which drops
#: its refs here): still admitted after the drain's admit window (the refs live only here), as long as the
#: server listens.
REF_METHODS = frozenset({PATH_DEREF, PATH_RELEASE, ROUTE_DEREF, ROUTE_RELEASE, PATH_END_RUN})

#: ``admit(authorization) -> None`` (admitted) or the refusal ``(status, message)``.
Admit = Callable[[Any], "tuple[Status, str] | None"]

_OK = grpc.StatusCode.OK
_STATUS_TEXT = {n: str(n) for n in range(100, 600)}
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
_CODE_NAMES = {c: c.name for c in grpc.StatusCode}  # Enum.name is a property lookup per access
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="blazen-peer"'}


class ConcurrencyLimiter:
    """At most ``limit`` concurrent calls (None or 0: unlimited). Thread-safe and non-blocking: a call over
    the limit is refused at once, never queued, so the caller can back off or go to another replica."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit or None
        self._lock = threading.Lock()
        self.in_use = 0
        self.message = f"{CONCURRENCY_REFUSED}: the limit of {self.limit} is reached, retry later"

    def try_acquire(self) -> bool:
        with self._lock:
            if self.limit is not None and self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def occupy(self) -> None:
        """Take a slot even over the limit: for work that is already running (a step that outlived its
        run, see engine/executor.py); ``release()`` it when that work ends."""
        with self._lock:
            self.in_use += 1

    def release(self) -> None:
        with self._lock:
            if self.in_use <= 0:
                raise RuntimeError("release() without a matching acquire")
            self.in_use -= 1


def _aio_code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    """The status a grpc.aio call ended with: the code set on the context (``set_code`` or ``abort``),
    else UNKNOWN for an exception, CANCELLED for a cancellation, OK otherwise."""
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN if isinstance(exc, Exception) else grpc.StatusCode.CANCELLED


class Admission:
    """The admission of one listener: shared drain, limiter and metrics; the token check where the listener
    has one (``tokens`` None: none, e.g. ``--plaintext-grpc-addr``). ``transport`` labels the metrics."""

    def __init__(
        self,
        *,
        drainer: Drainer,
        limiter: ConcurrencyLimiter,
        metrics: PeerMetrics,
        tokens: TokenSource | None,
        transport: str,
    ) -> None:
        self.drainer = drainer
        self.limiter = limiter
        self.metrics = metrics
        self.tokens = tokens
        self.transport = transport

    def gate(self, method: str) -> tuple[Admit, Callable[[], None]]:
        """``(admit, release)`` for calls to ``method`` (gRPC path or HTTP route); ``release`` only after an
        admitted call. Built once per method, so a call costs a few local lookups."""
        drainer, limiter, tokens = self.drainer, self.limiter, self.tokens
        limited = method in LIMITED_METHODS
        ref_call = method in REF_METHODS

        def admit(authorization: Any) -> tuple[Status, str] | None:
            try:
                drainer.enter(ref_call=ref_call)
            except DrainingError as exc:
                return exc.status, exc.message
            if tokens is not None:
                reason = tokens.why_rejected(authorization)
                if reason is not None:
                    drainer.exit()
                    log.info("rejected unauthenticated call to %s: %s", method, reason)
                    return Status.UNAUTHENTICATED, reason
            if limited and not limiter.try_acquire():
                drainer.exit()
                return Status.RESOURCE_EXHAUSTED, limiter.message
            return None

        if limited:

            def release() -> None:
                limiter.release()
                drainer.exit()

            return admit, release
        return admit, drainer.exit

    def call_gate(self, method: str) -> tuple[Admit, Callable[[], None], CallStats]:
        """``gate(method)`` and the metrics recorder of its calls, for a data plane that admits the calls
        itself: the router's relay (``routing.relay``), which counts them as this listener's."""
        admit, release = self.gate(method)
        return admit, release, self.metrics.stats(self.transport, method_label(method))

    # -- gRPC ---------------------------------------------------------------------------------------------
    def grpc_wrapper(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` (one of the four BlazenPeer methods) behind the gate; a ``MethodWrapper``."""
        stats = self.metrics.stats(self.transport, method_label(method))
        admit, release = self.gate(method)

        def enter(context: Any, start: float) -> bool:
            """Admits the call (True), or answers it with the refusal and counts it (False)."""
            # One pass over the metadata: log context and token. No unbind: grpc.aio serves every call in a
            # task of its own, whose context ends with the call.
            caller = rid = authorization = None
            for item in context.invocation_metadata() or ():
                key = item[0]
                if key == NODE_ID_METADATA:
                    caller = item[1]
                elif key == REQUEST_ID_METADATA:
                    rid = item[1]
                elif key == AUTHORIZATION_METADATA and authorization is None:
                    authorization = item[1]
            bind_log_context(caller, rid or new_request_id())
            refused = admit(authorization)
            # counted from here, so that whatever raised above leaves no call in flight in the metrics
            stats.start()
            if refused is None:
                return True
            code = GRPC_CODES[refused[0]]
            context.set_code(code)
            context.set_details(refused[1])
            stats.finish(_CODE_NAMES[code], time.perf_counter() - start)
            return False

        def leave(context: Any, start: float, exc: BaseException | None) -> None:
            """An admitted call's end: its slot released, its status counted."""
            release()
            stats.finish(_CODE_NAMES[_aio_code(context, exc)], time.perf_counter() - start)

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                start = time.perf_counter()
                if not enter(context, start):
                    return
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    leave(context, start, exc)
                    raise
                leave(context, start, None)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner = handler.unary_unary

        async def unary_unary(request: bytes, context: Any) -> bytes | None:
            start = time.perf_counter()
            if not enter(context, start):
                return None
            try:
                result: bytes | None = await inner(request, context)
            except BaseException as exc:
                leave(context, start, exc)
                raise
            leave(context, start, None)
            return result

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- HTTP ---------------------------------------------------------------------------------------------
    def http_middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """The gate as an aiohttp middleware (inside the CORS middleware, outside the shim's JSON-error
        middleware). CORS preflights (``OPTIONS``) pass untouched; every answer carries ``X-Request-Id``."""
        gates = {route: self.gate(route) for route in (ROUTE_INVOKE, ROUTE_DEREF, ROUTE_RELEASE)}
        metrics, transport = self.metrics, self.transport

        @web.middleware
        async def admission_middleware(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if request.method == "OPTIONS":
                return await handler(request)
            path = request.path
            # An unknown path (answered 404/405 by the shim) gets a gate of its own, never cached.
            admit, release = gates.get(path) or self.gate(path)
            headers = request.headers
            rid = headers.get(REQUEST_ID_HEADER) or new_request_id()
            bound = bind_log_context(headers.get(NODE_ID_HEADER), rid)
            stats = metrics.stats(transport, method_label(path))
            start = time.perf_counter()
            stats.start()
            status = 500
            try:
                refused = admit(headers.get(AUTHORIZATION_HEADER))
                if refused is not None:
                    status = refused[0].http
                    return web.json_response(
                        {"error": refused[1]},
                        status=status,
                        headers=_CHALLENGE if refused[0] is Status.UNAUTHENTICATED else None,
                    )
                try:
                    resp = await handler(request)
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                except asyncio.CancelledError:
                    status = 499  # the caller hung up and the handler was cancelled (nginx's code for it)
                    raise
                finally:
                    release()
                status = resp.status
                resp.headers[REQUEST_ID_HEADER] = rid
                return resp
            finally:
                stats.finish(_STATUS_TEXT.get(status) or str(status), time.perf_counter() - start)
                unbind_log_context(bound)

        return admission_middleware
