"""Run per-call guards around gRPC handlers and aiohttp requests.

A *guard* is any object with ``enter(method) -> state`` (raise a ``PeerRejected`` to refuse the call)
and ``exit(state, code)``. The drain helper, the concurrency limiter and the metrics recorder are
guards; ``AioGuardInterceptor``/``GuardInterceptor`` and ``make_guard_middleware`` run a list of them
in order (``exit`` in reverse), so one interceptor per listener covers all of them.

``code`` passed to ``exit`` is a ``grpc.StatusCode`` for gRPC calls and the HTTP status (int) for
aiohttp requests.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import grpc
from aiohttp import web

from .errors import PeerRejected

__all__ = ["AioGuardInterceptor", "CallGuard", "GuardInterceptor", "make_guard_middleware"]

log = logging.getLogger("blazen_peer.security.guard")


class CallGuard(Protocol):
    def enter(self, method: str) -> Any: ...

    def exit(self, state: Any, code: Any) -> None: ...


def _enter_all(guards: Sequence[CallGuard], method: str, *, http: bool) -> list[tuple[CallGuard, Any]]:
    entered: list[tuple[CallGuard, Any]] = []
    try:
        for g in guards:
            entered.append((g, g.enter(method)))
    except PeerRejected as exc:
        _exit_all(entered, exc.http_status if http else exc.grpc_code)
        raise
    return entered


def _exit_all(entered: list[tuple[CallGuard, Any]], code: Any) -> None:
    for g, state in reversed(entered):
        try:
            g.exit(state, code)
        except Exception:
            log.exception("call guard %r failed on exit", g)


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


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


class _GuardBase:
    def __init__(self, guards: Iterable[CallGuard], *, methods: Iterable[str] | None = None) -> None:
        self._guards = tuple(guards)
        self._methods = frozenset(methods) if methods is not None else None

    def _applies(self, method: str) -> bool:
        return self._methods is None or method in self._methods


class AioGuardInterceptor(_GuardBase, grpc.aio.ServerInterceptor):
    """grpc.aio interceptor running ``guards`` around every unary-request call (``methods``: only
    these full method paths; None: all)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._applies(method) or handler.request_streaming:
            return handler
        guards = self._guards

        if handler.response_streaming:
            inner = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    entered = _enter_all(guards, method, http=False)
                except PeerRejected as exc:
                    await context.abort(exc.grpc_code, exc.message)
                    return
                exc_seen: BaseException | None = None
                try:
                    result = inner(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                except BaseException as e:
                    exc_seen = e
                    raise
                finally:
                    _exit_all(entered, _aio_code(context, exc_seen))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_uu = handler.unary_unary

        async def unary_unary(request, context):
            try:
                entered = _enter_all(guards, method, http=False)
            except PeerRejected as exc:
                await context.abort(exc.grpc_code, exc.message)
            exc_seen: BaseException | None = None
            try:
                return await inner_uu(request, context)
            except BaseException as e:
                exc_seen = e
                raise
            finally:
                _exit_all(entered, _aio_code(context, exc_seen))

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GuardInterceptor(_GuardBase, grpc.ServerInterceptor):
    """The same for a synchronous ``grpc.server`` (unary-unary calls; exit code OK unless the handler
    raised, since a sync context does not expose the code it was given)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._applies(method) or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return handler
        guards = self._guards
        inner = handler.unary_unary

        def unary_unary(request, context):
            try:
                entered = _enter_all(guards, method, http=False)
            except PeerRejected as exc:
                context.abort(exc.grpc_code, exc.message)
            code = grpc.StatusCode.OK
            try:
                return inner(request, context)
            except BaseException:
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                _exit_all(entered, code)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def make_guard_middleware(
    guards: Iterable[CallGuard],
    *,
    method_of: Callable[[web.Request], str | None] = lambda r: r.path if r.method != "OPTIONS" else None,
) -> Callable[..., Any]:
    """aiohttp middleware running ``guards`` around requests; ``method_of`` names the call (None: not
    guarded, e.g. CORS preflights). A refusal answers ``{"error": message}`` with its HTTP status."""
    guards = tuple(guards)

    @web.middleware
    async def guard_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        method = method_of(request)
        if method is None:
            return await handler(request)
        try:
            entered = _enter_all(guards, method, http=True)
        except PeerRejected as exc:
            return web.json_response({"error": exc.message}, status=exc.http_status)
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            _exit_all(entered, status)

    return guard_middleware
