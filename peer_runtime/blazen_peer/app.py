"""The composition root: builds, from a server's ``PeerConfig``, every part the runtime adds around the
engine and the transports, and hands them back as one ``PeerRuntime``.

``BlazenPeerServer.start()`` calls ``compose(server)`` once, before any listener binds
(docs/architecture.md). From the config it builds:

* the security decisions (``security.policy``): TLS material that follows its Secret (``ReloadingTlsSource``),
  the bearer ``TokenSource``, the secure-by-default check;
* one ``Readiness``, ``PeerMetrics``, ``Drainer`` and ``ConcurrencyLimiter`` shared by every listener;
* the admission of each listener (``admission.Admission``): ``--grpc-addr`` and the HTTP shim check the
  token, ``--plaintext-grpc-addr`` does not (Blazen's own clients send none);
* the gRPC health service, the admin app, CORS, forwarding credentials (mTLS and the token) and the
  lifecycle: ready once every listener is bound; on stop not ready, the drain's admit window, then the
  server closes its listeners within the grace (``on_stop``, ``on_closed``).

The server runs with ``hooks.combine(runtime.hooks, user_hooks)``: a caller's ``ServerHooks`` add to
these parts, never replace them, and are never modified.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .admin.app import make_admin_app
from .admin.drain import Drainer
from .admin.health import AioReadinessHealthServicer, add_health_servicer
from .admin.metrics import PeerMetrics
from .admin.readiness import Readiness
from .admission import Admission, ConcurrencyLimiter
from .hooks import ServerHooks
from .pki.reload import ClientAuth, ReloadingTlsSource
from .pki.tls import TlsMaterial, first_dns_name, trust_report
from .security.auth import TokenSource
from .security.cors import make_cors_middleware
from .security.fleet_router import FleetRouterGuard
from .security.policy import (
    TlsClientAuth,
    check_secure,
    fleet_router_guard,
    fleet_router_token,
    http_auth,
    load_tls,
    tls_client_auth,
    token_source,
)
from .transport.channels import TARGET_NAME_OPTION

if TYPE_CHECKING:
    from .server import BlazenPeerServer

__all__ = ["PeerRuntime", "compose"]

log = logging.getLogger("blazen_peer.app")


@dataclass
class PeerRuntime:
    """What ``compose`` built for one server (``server.runtime``)."""

    readiness: Readiness
    metrics: PeerMetrics
    drainer: Drainer
    limiter: ConcurrencyLimiter
    tokens: TokenSource | None
    tls: ReloadingTlsSource | None
    #: ``--tls-client-auth`` resolved ("require" or "none"); None without TLS.
    tls_client_auth: TlsClientAuth | None = None
    hooks: ServerHooks = field(default_factory=ServerHooks)
    #: the DNS name forwarding asks siblings' certificates for (the first DNS SAN of ours).
    forward_server_name: str | None = None
    #: further tokens the server sends (a router's ``--pool-token-file``), hidden from the logs as well.
    outgoing_tokens: list[TokenSource] = field(default_factory=list)
    #: who may call ``blazen.fleet.v1`` RunStep / EndRun here (``--fleet-router-*``).
    fleet_guard: FleetRouterGuard = field(default_factory=lambda: FleetRouterGuard(mtls=False))
    #: the fleet router's token (``--fleet-router-token-file``): checked by a peer, sent by a router.
    fleet_router_token: TokenSource | None = None
    #: the admission of the main gRPC listener (the router's relay admits its calls through it too)
    admission: Admission | None = None
    _trust_report: tuple[int, dict[str, Any]] | None = field(default=None, repr=False)

    def tls_info(self) -> dict[str, Any] | None:
        """The ``tls`` field of ``/v1/info``: how callers are authenticated, whom outbound hops trust (the
        CA bundle, or the system roots when the issuer wrote none), and the roots of the bundle and the leaf
        served (``pki.tls.trust_report``, once per certificate generation), which the operator follows
        during a CA rotation."""
        if self.tls is None:
            return None
        generation = self.tls.generation
        if self._trust_report is None or self._trust_report[0] != generation:
            self._trust_report = (generation, trust_report(self.tls.material))
        return {
            "client_auth": self.tls_client_auth or "none",
            "outbound_trust": "ca-bundle" if self.tls.material.ca_pem is not None else "system-roots",
            **self._trust_report[1],
        }

    def secrets(self) -> list[str]:
        """Values the log redaction hides (the bearer tokens)."""
        sources = [self.tokens, *self.outgoing_tokens] if self.tokens is not None else self.outgoing_tokens
        return [s for t in sources for s in t.secrets()]


def compose(server: BlazenPeerServer) -> PeerRuntime:
    cfg = server.config
    tokens = token_source(cfg)
    client_auth = tls_client_auth(cfg, tokens)
    tls = load_tls(cfg, client_auth)
    check_secure(cfg, tls, tokens)
    shim_auth = http_auth(cfg, tls, tokens, client_auth)

    readiness = Readiness()
    metrics = PeerMetrics()
    drainer = Drainer(readiness, grace_period=cfg.shutdown_grace_secs, admit_window=cfg.shutdown_admit_secs)
    limiter = ConcurrencyLimiter(cfg.max_concurrent_workflows or None)
    rt = PeerRuntime(readiness, metrics, drainer, limiter, tokens, tls, client_auth)
    hooks = rt.hooks
    rt.fleet_router_token = fleet_router_token(cfg)
    if rt.fleet_router_token is not None:
        rt.outgoing_tokens.append(rt.fleet_router_token)
    rt.fleet_guard = fleet_router_guard(cfg, client_auth, rt.fleet_router_token)

    def admission(transport: str, tokens: TokenSource | None) -> Admission:
        return Admission(
            drainer=drainer, limiter=limiter, metrics=metrics, tokens=tokens, transport=transport
        )

    # Past the cap grpc closes a new connection at accept, and one whose handshake is not done within
    # --idle-timeout-secs (grpc's default: 120 s), both silently.
    hooks.grpc_options += [
        ("grpc.max_allowed_incoming_connections", cfg.connection_cap()),
        ("grpc.server_handshake_timeout_ms", int(cfg.idle_timeout_secs * 1000)),
    ]
    # gRPC: the main server (TLS, token) and the plaintext server (no token).
    rt.admission = admission("grpc", tokens)
    hooks.grpc_method_wrapper = rt.admission.grpc_wrapper
    hooks.plaintext_grpc_method_wrapper = admission("grpc-plaintext", None).grpc_wrapper
    health = AioReadinessHealthServicer(readiness)
    hooks.grpc_server_setup.append(lambda srv: add_health_servicer(srv, health))

    # HTTP shim: CORS outermost (every answer, 401/429/503 included, carries its headers), then admission.
    if cfg.cors_allow_origin:
        hooks.http_middlewares.append(make_cors_middleware(cfg.cors_allow_origin))
    shim_tokens = tokens if shim_auth is None or shim_auth.check_token else None
    hooks.http_middlewares.append(admission("http", shim_tokens).http_middleware())

    if tls is not None:
        _wire_tls(server, rt, tls, shim_auth.client_auth if shim_auth is not None else "none")
    if tokens is not None:
        hooks.forward_metadata = tokens.metadata

    metrics.track_refs(lambda: (server.refs.count, server.refs.bytes_used))

    def admin_app(s: BlazenPeerServer) -> web.Application:
        return make_admin_app(
            readiness=readiness, metrics=metrics, info=lambda: {**s.info(), "tls": rt.tls_info()}
        )

    hooks.admin_app_factory = admin_app
    readiness.add_listener(server.set_ready)

    def on_ready(s: BlazenPeerServer) -> None:
        if tls is not None:
            tls.start()
        readiness.set_ready()

    async def on_stop(s: BlazenPeerServer) -> None:
        if s.stop_grace is not None:
            drainer.grace_period = s.stop_grace
        await drainer.admit_window_over()

    def on_closed(s: BlazenPeerServer) -> None:
        drainer.finish()
        if tls is not None:
            tls.stop()

    hooks.on_ready.append(on_ready)
    hooks.on_stop.append(on_stop)
    hooks.on_closed.append(on_closed)
    return rt


def _wire_tls(
    server: BlazenPeerServer, rt: PeerRuntime, tls: ReloadingTlsSource, client_auth: ClientAuth
) -> None:
    """gRPC and HTTPS credentials that follow the certificate files, and forwarding over mTLS."""
    hooks = rt.hooks
    mutual = rt.tls_client_auth == "require"
    hooks.grpc_server_credentials = lambda: tls.grpc_server_credentials(require_client_auth=mutual)
    hooks.http_ssl_context = lambda: tls.ssl_context(client_auth=client_auth)
    rt.metrics.track_tls(tls, "peer")
    rt.forward_server_name = first_dns_name(tls.material.cert_chain_pem)

    def forward_options() -> list[tuple[str, Any]]:
        name = rt.forward_server_name
        return [(TARGET_NAME_OPTION, name)] if name else []

    hooks.forward_channel_credentials = tls.grpc_channel_credentials
    hooks.forward_channel_options = forward_options
    loop = asyncio.get_running_loop()

    def on_reload(material: TlsMaterial) -> None:  # the polling thread
        rt.forward_server_name = first_dns_name(material.cert_chain_pem)
        loop.call_soon_threadsafe(server.reset_forwarding)
        log.info("TLS certificate reloaded: serial %x, notAfter %s", material.serial, material.not_after)

    tls.add_listener(on_reload)
    info = rt.tls_info() or {}
    log.info(
        "TLS on: serial %x, notAfter %s, --tls-client-auth %s: %s; outbound hops verify servers against %s",
        tls.material.serial,
        tls.material.not_after,
        rt.tls_client_auth,
        "gRPC requires a client certificate chained to --tls-ca"
        if mutual
        else "no TLS listener asks for a client certificate, every call on them needs the bearer token",
        "the CA bundle" if info.get("outbound_trust") == "ca-bundle" else "the system roots",
        extra={"tls": info},
    )
