"""The HTTP/JSON shim Blazen's ``HttpPeerClient`` posts to (Rust, Python, Node, WASM), on aiohttp.

Routes: ``POST /v1/peer/invoke_sub_workflow``, ``/v1/peer/deref_session_ref``,
``/v1/peer/release_session_ref``.
Bodies use Blazen's serde_json rendering (wire/json_form.py). Failures that gRPC reports as a status are
non-2xx
with ``{"error": "..."}``; workflow errors and timeouts stay 200 with ``"error"`` set, as in gRPC. Limits
answer 429: a body over ``--http-max-body-bytes``, a full session-ref cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from ..engine.service import PeerService
from ..wire import json_form
from ..wire.errors import PeerStatusError, Status
from ..wire.messages import DerefRequest, DerefResponse, ReleaseRequest, ReleaseResponse
from ..wire.protocol import NODE_ID_HEADER, ROUTE_DEREF, ROUTE_INVOKE, ROUTE_RELEASE

log = logging.getLogger("blazen_peer.http")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 4 MiB payload rendered as an int array is ~16 MiB of JSON

SERVICE_KEY = web.AppKey("blazen_peer_service", PeerService)


def _error(status: Status, message: str) -> web.Response:
    return web.Response(
        status=status.http,
        text=json.dumps({"error": message}, ensure_ascii=False),
        content_type="application/json",
    )


def _ok(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


def body_too_large_message(limit: int) -> str:
    """aiohttp's own text for a body over ``client_max_size``, naming the flag that sets it."""
    return f"Maximum request body size {limit} exceeded (--http-max-body-bytes)"


async def _body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        # A limit like the others: RESOURCE_EXHAUSTED / 429 naming it (aiohttp alone would answer 413).
        raise PeerStatusError(
            Status.RESOURCE_EXHAUSTED, body_too_large_message(request.client_max_size)
        ) from None
    try:
        return json_form.loads(raw)
    except json_form.JsonFormError as exc:
        raise PeerStatusError(Status.INVALID_ARGUMENT, f"invalid request JSON: {exc}") from None


async def _parse(request: web.Request, parse: Callable[..., Any], *args: Any) -> Any:
    """The request body through a ``json_form`` parser; a malformed one is INVALID_ARGUMENT."""
    try:
        return parse(await _body(request), *args)
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
    return _ok(json_form.response_to_json(resp))


async def deref(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    _caller(request, ROUTE_DEREF)
    try:
        req = await _parse(request, json_form.ref_request_from_json, DerefRequest)
        payload = await service.deref(req.ref_uuid, version=req.envelope_version)
    except PeerStatusError as exc:
        return _error(exc.status, exc.message)
    return _ok(json_form.deref_response_to_json(DerefResponse(payload)))


async def release(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    _caller(request, ROUTE_RELEASE)
    try:
        req = await _parse(request, json_form.ref_request_from_json, ReleaseRequest)
        released = await service.release(req.ref_uuid, version=req.envelope_version)
    except PeerStatusError as exc:
        return _error(exc.status, exc.message)
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
) -> web.Application:
    """The shim app. ``middlewares`` (auth, CORS, metrics) run outside the JSON-error middleware."""
    app = web.Application(middlewares=[*middlewares, _json_errors], client_max_size=max_body_bytes)
    app[SERVICE_KEY] = service
    app.router.add_post(ROUTE_INVOKE, invoke)
    app.router.add_post(ROUTE_DEREF, deref)
    app.router.add_post(ROUTE_RELEASE, release)
    return app
