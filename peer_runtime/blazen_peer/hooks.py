"""``ServerHooks``: what a caller of ``BlazenPeerServer`` may add to the server the composition root
(``blazen_peer.app``) builds from its ``PeerConfig``.

The runtime's own parts (admission, TLS, health, admin app, forwarding credentials, drain) come in as a
``ServerHooks`` of their own; ``combine(runtime, user)`` joins the two, never replacing the user's: lists
run the runtime's entries first, method wrappers nest (the runtime's admission outermost), and a single
callable the user set (credentials, an SSL context, the admin app) wins over the runtime's.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from .transport.grpc_server import MethodWrapper

if TYPE_CHECKING:
    from .server import BlazenPeerServer

Callback = Callable[["BlazenPeerServer"], Awaitable[None] | None]


@dataclass
class ServerHooks:
    #: per-call wrapper around the four BlazenPeer methods of ``--grpc-addr`` (a ``MethodWrapper``).
    grpc_method_wrapper: MethodWrapper | None = None
    #: the same for the separate server behind ``--plaintext-grpc-addr``.
    plaintext_grpc_method_wrapper: MethodWrapper | None = None
    #: called with each grpc.aio server before it starts (e.g. to add the gRPC health service).
    grpc_server_setup: list[Callable[[grpc.aio.Server], None]] = field(default_factory=list)
    #: credentials for ``--grpc-addr``; None (or returning None) means plaintext. ``--plaintext-grpc-addr`` is
    #: always plaintext.
    grpc_server_credentials: Callable[[], grpc.ServerCredentials | None] | None = None
    #: extra grpc.aio server options (appended after ours, so they win).
    grpc_options: list[tuple[str, Any]] = field(default_factory=list)
    #: aiohttp middlewares for the HTTP/JSON shim, outermost first.
    http_middlewares: list[Any] = field(default_factory=list)
    #: called with the shim's ``web.Application`` before it starts (add routes, CORS preflight handlers ...).
    http_app_setup: list[Callable[[web.Application], None]] = field(default_factory=list)
    #: TLS for the HTTP shim; None means plain HTTP.
    http_ssl_context: Callable[[], ssl.SSLContext | None] | None = None
    #: builds the admin app (``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info``) served on
    #: ``--admin-addr``; without it no admin listener is started.
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


def _nest(outer: MethodWrapper | None, inner: MethodWrapper | None) -> MethodWrapper | None:
    if outer is None or inner is None:
        return outer or inner
    return lambda handler, method: outer(inner(handler, method), method)


def combine(runtime: ServerHooks, user: ServerHooks) -> ServerHooks:
    """The hooks a server runs with: ``runtime``'s and ``user``'s together (see the module docstring)."""
    out = ServerHooks()
    for f in fields(ServerHooks):
        mine, theirs = getattr(runtime, f.name), getattr(user, f.name)
        if isinstance(mine, list):
            value: Any = [*mine, *theirs]
        elif f.name.endswith("method_wrapper"):
            value = _nest(mine, theirs)
        else:
            value = theirs if theirs is not None else mine
        setattr(out, f.name, value)
    return out
