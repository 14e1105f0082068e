"""Seams for the security layer (TLS, token auth, CORS, health, metrics, drain, limits).

``blazen_peer.security.install(server)`` - when that function exists - is called once by
``BlazenPeerServer.start()`` before any listener binds. It reads ``server.config`` and fills ``server.hooks``.
Nothing in the transports imports the security package; they only consult these hooks.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc
    from aiohttp import web

    from ..server import BlazenPeerServer

Callback = Callable[["BlazenPeerServer"], Awaitable[None] | None]
#: ``wrap(handler, full_method_name) -> handler``: applied once to each BlazenPeer method handler when a gRPC
#: server is built.
MethodWrapper = Callable[["grpc.RpcMethodHandler", str], "grpc.RpcMethodHandler"]


@dataclass
class ServerHooks:
    #: per-call admission (auth, metrics, limits) around the four BlazenPeer methods of ``--grpc-addr``. A
    #: handler wrapper rather than a grpc.aio interceptor: grpc.aio runs an interceptor chain as extra
    #: coroutines on every call, which shows at concurrency 32 (docs/benchmarks.md).
    grpc_method_wrapper: MethodWrapper | None = None
    #: the same for the separate server behind ``--plaintext-grpc-addr`` (no token check there).
    plaintext_grpc_method_wrapper: MethodWrapper | None = None
    #: called with each grpc.aio server before it starts (e.g. to add the gRPC health service).
    grpc_server_setup: list[Callable[[grpc.aio.Server], None]] = field(default_factory=list)
    #: credentials for ``--grpc-addr``; None (or returning None) means plaintext. ``--plaintext-grpc-addr`` is
    #: always plaintext.
    grpc_server_credentials: Callable[[], grpc.ServerCredentials | None] | None = None
    #: extra grpc.aio server options (appended after ours, so they win).
    grpc_options: list[tuple[str, Any]] = field(default_factory=list)
    #: aiohttp middlewares for the HTTP/JSON shim (auth, CORS, metrics, limits), outermost first.
    http_middlewares: list[Any] = field(default_factory=list)
    #: called with the shim's ``web.Application`` before it starts (add routes, CORS preflight handlers ...).
    http_app_setup: list[Callable[[web.Application], None]] = field(default_factory=list)
    #: TLS for the HTTP shim; None means plain HTTP.
    http_ssl_context: Callable[[], ssl.SSLContext | None] | None = None
    #: builds the admin app (``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info``) served on
    #: ``--admin-addr``;
    #: without it no admin listener is started.
    admin_app_factory: Callable[[BlazenPeerServer], web.Application] | None = None
    #: channel credentials and extra metadata for session-ref forwarding to sibling replicas.
    forward_channel_credentials: Callable[[], grpc.ChannelCredentials | None] | None = None
    forward_metadata: Callable[[], list[tuple[str, str]]] | None = None
    #: extra channel options for forwarding channels (e.g. ``grpc.ssl_target_name_override``).
    forward_channel_options: Callable[[], list[tuple[str, Any]]] | None = None
    #: lifecycle callbacks: after all listeners are bound (the server is then ready); when stopping, before
    #: the listeners close (the drain's admit window runs here); once the listeners are closed.
    on_ready: list[Callback] = field(default_factory=list)
    on_stop: list[Callback] = field(default_factory=list)
    on_closed: list[Callback] = field(default_factory=list)
