"""The HTTP/JSON shim Blazen's ``HttpPeerClient`` posts to (Rust, Python, Node, WASM), on aiohttp.

Routes: ``POST /v1/peer/invoke_sub_workflow``, ``/v1/peer/deref_session_ref``,
``/v1/peer/release_session_ref``.
Bodies use Blazen's serde_json rendering (wire/json_form.py). Failures that gRPC reports as a status are
non-2xx
with ``{"error": "..."}``; workflow errors and timeouts stay 200 with ``"error"`` set, as in gRPC. Limits
answer 429: a body over ``--http-max-body-bytes``, a full session-ref cache. Only JSON is taken (415), and
a body that stalls for ``--idle-timeout-secs`` is refused 408.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from ..engine.service import PeerService
from ..wire import json_form
from ..wire.errors import PeerStatusError, Status
from ..wire.json_request import request_from_json_bytes
from ..wire.messages import DerefRequest, DerefResponse, ReleaseRequest, ReleaseResponse
from ..wire.protocol import NODE_ID_HEADER, ROUTE_DEREF, ROUTE_INVOKE, ROUTE_RELEASE

log = logging.getLogger("blazen_peer.http")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 4 MiB payload rendered as an int array is ~16 MiB of JSON

SERVICE_KEY = web.AppKey("blazen_peer_service", PeerService)
_MAX_BODY_KEY = web.AppKey("blazen_peer_max_body", int)
_STALL_KEY = web.AppKey("blazen_peer_body_stall", float)


def _error(status: Status, message: str) -> web.Response:
    return _http_error(status.http, message)


def _http_error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": message}, ensure_ascii=False),
        content_type="application/json",
    )


def _ok(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


def body_too_large_message(limit: int) -> str:
    return f"Maximum request body size {limit} exceeded (--http-max-body-bytes)"


class _HttpRefusal(Exception):
    """A request the shim refuses with an HTTP status that has no gRPC twin (415, 408)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _check_content_type(request: web.Request) -> None:
    # Only JSON: a text/plain, form or typeless POST is a "simple" cross-site request a browser sends with
    # no CORS preflight, so accepting one would let any web page make its visitors call this peer.
    if request.content_type != "application/json":
        raise _HttpRefusal(
            415, f"Content-Type must be application/json, not {request.content_type or 'none'!r}"
        )


async def _read_body(request: web.Request) -> bytearray:
    """The body, refused (429) before it is read when its Content-Length is over the limit, and as soon as
    a chunked one passes it; a body that stalls for the idle timeout is refused 408. One buffer that grows
    with what has arrived (never with what the Content-Length promises: a client announcing 64 MiB and
    sending nothing costs nothing); large buffers grow in place (``mremap``), so the peak stays near the
    body's size where ``request.read()`` would hold it twice."""
    limit: int = request.app[_MAX_BODY_KEY]
    length = request.content_length
    if length is not None and length > limit:
        raise PeerStatusError(Status.RESOURCE_EXHAUSTED, body_too_large_message(limit))
    content = request.content
    buf = bytearray()
    while True:
        chunk = content.read_nowait()
        if not chunk:
            if content.is_eof():
                break
            try:
                async with asyncio.timeout(request.app[_STALL_KEY]):
                    chunk = await content.readany()
            except TimeoutError:
                raise _HttpRefusal(408, "request body stalled (--idle-timeout-secs)") from None
            if not chunk:
                break
        if len(buf) + len(chunk) > limit:
            raise PeerStatusError(Status.RESOURCE_EXHAUSTED, body_too_large_message(limit))
        buf += chunk
    return buf


async def _parse(request: web.Request, parse: Callable[..., Any], *args: Any) -> Any:
    """The request body through a ``json_form`` parser; a malformed one is INVALID_ARGUMENT."""
    _check_content_type(request)
    raw = await _read_body(request)
    try:
        if parse is json_form.request_from_json:
            return request_from_json_bytes(raw)
        return parse(json_form.loads(raw), *args)
    except json_form.JsonFormError as exc:
        raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid request JSON: {exc}") from None


def _caller(request: web.Request, route: str) -> str | None:
    caller = request.headers.get(NODE_ID_HEADER)
    log.debug("POST %s from node %s (%s)", route, caller or "<unnamed>", request.remote)
    return caller


async def invoke(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    caller = _caller(request, ROUTE_INVOKE)
    try:
        req = await _parse(request, json_form.request_from_json)
        resp = await service.invoke(req, caller_node_id=caller)
    except PeerStatusError as exc:
        return _error(exc.status, exc.message)
    except _HttpRefusal as exc:
        return _http_error(exc.status, exc.message)
    return _ok(json_form.response_to_json(resp))


async def deref(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    _caller(request, ROUTE_DEREF)
    try:
        req = await _parse(request, json_form.ref_request_from_json, DerefRequest)
        payload = await service.deref(req.ref_uuid, version=req.envelope_version)
    except PeerStatusError as exc:
        return _error(exc.status, exc.message)
    except _HttpRefusal as exc:
        return _http_error(exc.status, exc.message)
    return _ok(json_form.deref_response_to_json(DerefResponse(payload)))


async def release(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    _caller(request, ROUTE_RELEASE)
    try:
        req = await _parse(request, json_form.ref_request_from_json, ReleaseRequest)
        released = await service.release(req.ref_uuid, version=req.envelope_version)
    except PeerStatusError as exc:
        return _error(exc.status, exc.message)
    except _HttpRefusal as exc:
        return _http_error(exc.status, exc.message)
    return _ok(json_form.release_response_to_json(ReleaseResponse(released)))


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every non-2xx answer from the shim carries ``{"error": "..."}``, including aiohttp's own 404/405
    (a body over ``--http-max-body-bytes`` is answered 429 by the handlers, see ``_body``)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = exc.status
        body = json.dumps(
            {"error": exc.reason if not exc.text or exc.text.startswith(str(status)) else exc.text}
        )
        return web.Response(status=status, text=body, content_type="application/json", headers=_allow(exc))


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def create_http_app(
    service: PeerService,
    *,
    middlewares: Iterable[Any] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_stall_secs: float = 15.0,
) -> web.Application:
    """The shim app. ``middlewares`` (auth, CORS, metrics) run outside the JSON-error middleware."""
    app = web.Application(middlewares=[*middlewares, _json_errors], client_max_size=max_body_bytes)
    app[SERVICE_KEY] = service
    app[_MAX_BODY_KEY] = max_body_bytes
    app[_STALL_KEY] = body_stall_secs
    app.router.add_post(ROUTE_INVOKE, invoke)
    app.router.add_post(ROUTE_DEREF, deref)
    app.router.add_post(ROUTE_RELEASE, release)
    return app
