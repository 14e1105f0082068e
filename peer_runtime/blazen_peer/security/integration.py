"""``install(server)``: wires the security building blocks into a ``BlazenPeerServer``'s hooks.

``BlazenPeerServer.start()`` calls it once, before any listener binds (docs/security.md, "How install wires
the blocks"). It builds, from ``server.config``:

* TLS: a ``ReloadingTlsSource`` (kubelet-style reload) giving grpcio dynamic server credentials (mTLS when
  ``--tls-ca`` is given) and the shim's swapping ``SSLContext`` (client certificates optional);
* the bearer ``TokenSource`` (``--token-file`` / ``--token`` / ``BLAZEN_PEER_TOKEN``);
* the secure-by-default check: neither TLS nor a token and no ``--insecure`` raises
  ``PeerInsecureConfigError``;
* one ``Readiness``, ``PeerMetrics``, ``Drainer`` and ``ConcurrencyLimiter`` shared by every listener;
* per-call admission, fused into one wrapper around each BlazenPeer gRPC method and one aiohttp middleware
  (the per-call cost matters, see docs/benchmarks.md): request context for the JSON logs (caller node id,
  request id), drain (UNAVAILABLE / 503), token (UNAUTHENTICATED / 401), concurrency
  (RESOURCE_EXHAUSTED / 429), metrics for every answer. The plaintext listener's server has the same
  wrapper without the token check;
* the gRPC health service on each gRPC server, the admin app, session-ref forwarding over mTLS with the
  token, and the drain in ``on_stop`` / ``on_closed`` (SIGTERM -> ``server.stop()``: not ready, the
  admit window, then the server closes its listeners within the grace).

The objects are kept on ``server.security`` (a ``SecurityState``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets as _secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web

from ..admin.app import make_admin_app
from ..admin.health import AioReadinessHealthServicer, add_health_servicer
from ..admin.metrics import CallStats, PeerMetrics, method_label
from ..admin.readiness import Readiness
from .auth import TokenSource
from .cors import make_cors_middleware
from .drain import Drainer
from .errors import DrainingError, PeerInsecureConfigError, PeerTlsError
from .limits import ConcurrencyLimiter
from .logging import _CALLER, _REQUEST
from .reload import ReloadingTlsSource

if TYPE_CHECKING:
    from ..server import BlazenPeerServer

__all__ = ["INSECURE_MESSAGE", "LIMITED_METHODS", "SecurityState", "install"]

log = logging.getLogger("blazen_peer.security")

INSECURE_MESSAGE = (
    "refusing to start: neither TLS (--tls-cert/--tls-key[/--tls-ca]) nor a bearer token (--token-file, "
    "--token or BLAZEN_PEER_TOKEN) is configured; pass --insecure (BLAZEN_PEER_INSECURE=1) to serve "
    "without either"
)
#: calls that start a sub-workflow: the ones ``--max-concurrent-workflows`` counts, on both transports.
LIMITED_METHODS = frozenset(
    {
        "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow",
        "/blazen.peer.v1.BlazenPeer/StreamSubWorkflowEvents",
        "/v1/peer/invoke_sub_workflow",
    }
)
NODE_ID_KEY = "x-blazen-peer-node-id"
REQUEST_ID_KEY = "x-request-id"
_AUTHORIZATION = "authorization"
_OK = grpc.StatusCode.OK
_STATUS_TEXT = {n: str(n) for n in range(100, 600)}
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
_CODE_NAMES = {c: c.name for c in grpc.StatusCode}  # Enum.name is a property lookup per access


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


@dataclass
class SecurityState:
    """What ``install`` built; ``server.security``."""

    readiness: Readiness
    metrics: PeerMetrics
    drainer: Drainer
    limiter: ConcurrencyLimiter
    tokens: TokenSource | None
    tls: ReloadingTlsSource | None
    forward_server_name: str | None = None

    def secrets(self) -> list[str]:
        """Values the log redaction hides (the bearer tokens)."""
        return self.tokens.secrets() if self.tokens is not None else []


class _RequestIds:
    """Cheap unique request ids: a random per-process prefix and a counter (no syscall per call)."""

    def __init__(self) -> None:
        self._prefix = _secrets.token_hex(4)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._count):x}"


_new_request_id = _RequestIds()


class _Admission:
    """The per-call checks shared by the gRPC method wrapper and the HTTP middleware."""

    def __init__(
        self,
        state: SecurityState,
        transport: str,
        *,
        check_token: bool,
    ) -> None:
        self.drainer = state.drainer
        self.limiter = state.limiter
        self.tokens = state.tokens if check_token else None
        self.metrics = state.metrics
        self.transport = transport

    def stats(self, label: str) -> CallStats:
        return self.metrics.stats(self.transport, label)


class PeerCallAdmission:
    """Wraps each BlazenPeer gRPC method handler, once, with the per-call work: log context, drain, token,
    concurrency, metrics (``hooks.grpc_method_wrapper``).

    Order of the checks (the answer of the first that refuses is sent): drain (UNAVAILABLE), token
    (UNAUTHENTICATED), concurrency (RESOURCE_EXHAUSTED). Every answer is counted, refusals included;
    a refused call never holds a concurrency slot. The gRPC health service and unknown methods are other
    handlers, never wrapped: kubelet probes carry no token, and health ``Watch`` streams must not hold the
    drain open.
    """

    def __init__(self, state: SecurityState, *, transport: str = "grpc", check_token: bool = True) -> None:
        self._adm = _Admission(state, transport, check_token=check_token)

    def __call__(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        adm = self._adm
        label = method_label(method)
        stats = adm.stats(label)
        limited = method in LIMITED_METHODS
        drainer, limiter, tokens = adm.drainer, adm.limiter, adm.tokens

        def admit(metadata: Any) -> Any:
            """None (admitted: drain entered, slot taken if limited) or the refusal (code, message)."""
            try:
                drainer.enter(ref_call=not limited)
            except DrainingError as exc:
                return exc.grpc_code, exc.message
            if tokens is not None:
                reason = tokens.check_metadata(metadata)
                if reason is not None:
                    drainer.exit()
                    log.info("rejected unauthenticated call to %s: %s", method, reason)
                    return grpc.StatusCode.UNAUTHENTICATED, reason
            if limited and not limiter.try_acquire():
                drainer.exit()
                return grpc.StatusCode.RESOURCE_EXHAUSTED, limiter.message
            return None

        def release() -> None:
            if limited:
                limiter.release()
            drainer.exit()

        def set_log_context(metadata: Any) -> None:
            # No reset: grpc.aio serves every call in a task of its own, whose context ends with the call.
            caller = rid = None
            for item in metadata or ():
                key = item[0]
                if key == NODE_ID_KEY:
                    caller = item[1]
                elif key == REQUEST_ID_KEY:
                    rid = item[1]
            _CALLER.set(caller)
            _REQUEST.set(rid or _new_request_id())

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                metadata = context.invocation_metadata()
                set_log_context(metadata)
                start = time.perf_counter()
                stats.start()
                code: Any = _OK
                try:
                    refused = admit(metadata)
                    if refused is not None:
                        code = refused[0]
                        context.set_code(code)
                        context.set_details(refused[1])
                        return
                    exc_seen: BaseException | None = None
                    try:
                        async for item in inner_stream(request, context):
                            yield item
                    except BaseException as exc:
                        exc_seen = exc
                        raise
                    finally:
                        release()
                        code = _aio_code(context, exc_seen)
                finally:
                    stats.finish(_CODE_NAMES[code], time.perf_counter() - start)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner = handler.unary_unary

        async def unary_unary(request, context):
            metadata = context.invocation_metadata()
            set_log_context(metadata)
            start = time.perf_counter()
            stats.start()
            code: Any = _OK
            try:
                refused = admit(metadata)
                if refused is not None:
                    code = refused[0]
                    context.set_code(code)
                    context.set_details(refused[1])
                    return None
                exc_seen: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    exc_seen = exc
                    raise
                finally:
                    release()
                    code = _aio_code(context, exc_seen)
            finally:
                stats.finish(_CODE_NAMES[code], time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def make_peer_middleware(state: SecurityState, *, transport: str = "http") -> Callable[..., Any]:
    """The same admission for the HTTP/JSON shim (inside the CORS middleware, outside the shim's
    JSON-error middleware). CORS preflights (``OPTIONS``) pass untouched."""
    adm = _Admission(state, transport, check_token=True)
    drainer, limiter, tokens = adm.drainer, adm.limiter, adm.tokens
    challenge = {"WWW-Authenticate": 'Bearer realm="blazen-peer"'}

    def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    @web.middleware
    async def peer_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return await handler(request)
        path = request.path
        label = method_label(path)
        headers = request.headers
        rid = headers.get("X-Request-Id") or _new_request_id()
        t_caller = _CALLER.set(headers.get("X-Blazen-Peer-Node-Id"))
        t_rid = _REQUEST.set(rid)
        stats = adm.stats(label)
        start = time.perf_counter()
        stats.start()
        status = 500
        try:
            try:
                drainer.enter(ref_call=path not in LIMITED_METHODS)
            except DrainingError as exc:
                status = exc.http_status
                return refuse(status, exc.message)
            limited = False
            try:
                if tokens is not None:
                    reason = tokens.why_rejected(headers.get("Authorization"))
                    if reason is not None:
                        log.info("rejected unauthenticated %s %s: %s", request.method, path, reason)
                        status = 401
                        return refuse(401, reason, challenge)
                if path in LIMITED_METHODS:
                    if not limiter.try_acquire():
                        status = 429
                        return refuse(429, limiter.message)
                    limited = True
                try:
                    resp = await handler(request)
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                status = resp.status
                resp.headers["X-Request-Id"] = rid
                return resp
            finally:
                if limited:
                    limiter.release()
                drainer.exit()
        finally:
            stats.finish(_STATUS_TEXT.get(status) or str(status), time.perf_counter() - start)
            _CALLER.reset(t_caller)
            _REQUEST.reset(t_rid)

    return peer_middleware


def _tokens_from(cfg: Any) -> TokenSource | None:
    if cfg.token_file:
        return TokenSource(token_file=cfg.token_file)
    if cfg.token and cfg.token.strip():
        return TokenSource(token=cfg.token)
    return None


def first_dns_name(cert_pem: bytes) -> str | None:
    """The first DNS subjectAltName of the leaf in ``cert_pem`` (the forwarding channel's target name)."""
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    names = san.get_values_for_type(x509.DNSName)
    return names[0] if names else None


def _wait_for_tls(cert: str, key: str, ca: str | None, wait_secs: float) -> ReloadingTlsSource:
    """Load the TLS files, waiting while some are still absent.

    A pod can start before cert-manager has filled its Secret (the operator creates the Secret up front so it
    carries an owner reference); exiting then would only buy a container restart. Files that exist but are
    invalid fail at once. This runs before any listener is up, so blocking the loop here costs nothing."""
    deadline = time.monotonic() + wait_secs
    next_note = 0.0
    while True:
        try:
            return ReloadingTlsSource(cert, key, ca)
        except PeerTlsError:
            missing = [p for p in (cert, key, ca) if p and not os.path.exists(p)]
            now = time.monotonic()
            if not missing or now >= deadline:
                raise
            if now >= next_note:
                log.info("waiting up to %.0f s for TLS files: %s", deadline - now, ", ".join(missing))
                next_note = now + 10
            time.sleep(0.5)


def install(server: BlazenPeerServer) -> SecurityState:
    cfg = server.config
    hooks = server.hooks
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise PeerTlsError("--tls-cert and --tls-key go together")
    if cfg.tls_ca and not cfg.tls_cert:
        raise PeerTlsError("--tls-ca needs --tls-cert and --tls-key")
    tokens = _tokens_from(cfg)
    tls = (
        _wait_for_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_ca or None, cfg.tls_wait_secs)
        if cfg.tls_cert
        else None
    )
    if tls is None and tokens is None and not cfg.insecure:
        raise PeerInsecureConfigError(INSECURE_MESSAGE)
    if tls is None and tokens is None:
        log.warning("serving without TLS and without a token (--insecure)")
    elif tls is not None and not cfg.tls_ca:
        log.warning("TLS without --tls-ca: gRPC clients are not asked for a certificate")

    readiness = Readiness()
    metrics = PeerMetrics()
    drainer = Drainer(readiness, grace_period=cfg.shutdown_grace_secs, admit_window=cfg.shutdown_admit_secs)
    limiter = ConcurrencyLimiter(cfg.max_concurrent_workflows or None)
    state = SecurityState(readiness, metrics, drainer, limiter, tokens, tls)
    server.security = state

    # gRPC: the main server (TLS, token) and the plaintext server (no token: Blazen's clients send none).
    hooks.grpc_method_wrapper = PeerCallAdmission(state, transport="grpc")
    hooks.plaintext_grpc_method_wrapper = PeerCallAdmission(
        state, transport="grpc-plaintext", check_token=False
    )
    health = AioReadinessHealthServicer(readiness)
    hooks.grpc_server_setup.append(lambda srv: add_health_servicer(srv, health))

    # HTTP shim: CORS outermost (every answer, 401/429/503 included, carries its headers), then admission.
    mws: list[Any] = []
    if cfg.cors_allow_origin:
        mws.append(make_cors_middleware(cfg.cors_allow_origin))
    mws.append(make_peer_middleware(state))
    hooks.http_middlewares[:0] = mws

    if tls is not None:
        src = tls
        hooks.grpc_server_credentials = src.grpc_server_credentials
        client_auth = "optional" if cfg.tls_ca else "none"
        hooks.http_ssl_context = lambda: src.ssl_context(client_auth=client_auth)
        metrics.track_tls(src, "peer")
        state.forward_server_name = first_dns_name(src.material.cert_chain_pem)

        def forward_credentials() -> grpc.ChannelCredentials:
            m = src.material
            return grpc.ssl_channel_credentials(m.ca_pem, m.private_key_pem, m.cert_chain_pem)

        def forward_options() -> list[tuple[str, Any]]:
            name = state.forward_server_name
            return [("grpc.ssl_target_name_override", name)] if name else []

        hooks.forward_channel_credentials = forward_credentials
        hooks.forward_channel_options = forward_options
        loop = asyncio.get_running_loop()

        def on_reload(material: Any) -> None:  # the polling thread
            state.forward_server_name = first_dns_name(material.cert_chain_pem)
            forwarder = getattr(server, "_forwarder", None)
            if forwarder is not None:
                loop.call_soon_threadsafe(forwarder.reset_channels)
            log.info("TLS certificate reloaded: serial %x, notAfter %s", material.serial, material.not_after)

        src.add_listener(on_reload)
        log.info(
            "TLS on: serial %x, notAfter %s, client certificates %s on gRPC",
            src.material.serial,
            src.material.not_after,
            "required" if cfg.tls_ca else "not requested",
        )
    if tokens is not None:
        hooks.forward_metadata = tokens.metadata

    metrics.track_refs(lambda: (server.refs.count, server.refs.bytes_used))
    hooks.admin_app_factory = lambda s: make_admin_app(readiness=readiness, metrics=metrics, info=s.info)
    readiness.add_listener(server.set_ready)

    def on_ready(s: Any) -> None:
        if tls is not None:
            tls.start()
        readiness.set_ready()

    async def on_stop(s: Any) -> None:
        grace = s.stop_grace
        if grace is not None:
            drainer.grace_period = grace
        await drainer.admit_window_over()

    def on_closed(s: Any) -> None:
        drainer.finish()
        if tls is not None:
            tls.stop()

    hooks.on_ready.insert(0, on_ready)
    hooks.on_stop.insert(0, on_stop)
    hooks.on_closed.insert(0, on_closed)
    return state
