"""``BlazenPeerServer``: binds the gRPC listener(s), the optional HTTP/JSON shim and the optional admin app
around one ``PeerService``, with the parts the composition root (``app.compose``) builds from its config."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from typing import Any

import grpc
from aiohttp import web

from .app import PeerRuntime, compose
from .config import PeerConfig
from .engine.executor import StepExecutor, default_workers
from .engine.refs import SessionRefStore
from .engine.registry import StepRegistry, default_registry, load_entrypoint
from .engine.remote import RemoteRuns
from .engine.service import PeerService
from .hooks import ServerHooks, combine
from .transport.fleet import fleet_methods
from .transport.forwarding import SiblingForwarder, split_host_port
from .transport.grpc_server import create_grpc_server, peer_methods
from .transport.http_listener import GuardedSite, make_runner
from .transport.http_shim import create_http_app
from .wire.errors import EntrypointError, PeerError
from .wire.fleet import Description
from .wire.protocol import ENVELOPE_VERSION

log = logging.getLogger("blazen_peer.server")


class ServerConsumedError(PeerError, RuntimeError):
    pass


class BlazenPeerServer:
    """``BlazenPeerServer(node_id)`` then ``await server.serve(addr)``. Serving consumes the server."""

    def __init__(
        self,
        node_id: str | None = None,
        *,
        config: PeerConfig | None = None,
        registry: StepRegistry | None = None,
        hooks: ServerHooks | None = None,
    ) -> None:
        cfg = dataclasses.replace(config) if config is not None else PeerConfig()
        if node_id is not None:
            cfg.node_id = node_id
        self.config = cfg
        #: the caller's hooks (added to the runtime's at start, never modified).
        self.hooks = hooks or ServerHooks()
        #: where the entrypoint registers its steps (imported in ``start()``, once the admin port is up).
        self._given_registry = registry
        self.registry = default_registry if registry is None else registry
        self.refs = SessionRefStore(
            max_count=cfg.ref_max_count, max_bytes=cfg.ref_max_bytes, parent_ttl_secs=cfg.ref_ttl_secs or None
        )
        self.service = PeerService(cfg.node_id, self.registry, served_steps=cfg.steps, refs=self.refs)
        #: the steps this peer runs for a router's split runs (``blazen.fleet.v1`` RunStep / EndRun).
        self.remote_runs = RemoteRuns(self.service, state_budget=cfg.split_state_cache_bytes)
        self.grpc_port: int | None = None
        self.plaintext_grpc_port: int | None = None
        self.http_port: int | None = None
        self.admin_port: int | None = None
        self._consumed = False
        self._ready = False
        self._grpc_servers: list[grpc.aio.Server] = []
        #: what ``app.compose`` built at start (readiness, metrics, drainer, limiter, tokens, TLS).
        self.runtime: PeerRuntime | None = None
        #: the grace period of the ``stop()`` in progress (on_stop hooks read it).
        self.stop_grace: float | None = None
        self._runners: list[web.AppRunner] = []
        self._admin_runner: web.AppRunner | None = None
        self._executor: StepExecutor | None = None
        self._forwarder: SiblingForwarder | None = None
        self._sweeper: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        #: the hooks in force once started (the runtime's and the caller's).
        self._hooks = self.hooks

    # -- hooks for health / info / drain ----------

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def ready(self) -> bool:
        """True once every listener is bound, until ``set_ready(False)`` (drain) or stop."""
        return self._ready

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def reset_forwarding(self) -> None:
        """New forwarding calls open new channels (after a certificate reload). Call on the event loop."""
        if self._forwarder is not None:
            self._forwarder.reset_channels()

    @property
    def served_step_ids(self) -> list[str]:
        return self.service.served_step_ids()

    def info(self) -> dict[str, Any]:
        """The body of ``GET /v1/info`` (docs/contracts.md)."""
        return {
            "node_id": self.node_id,
            "steps": self.served_step_ids,
            "envelope_version": ENVELOPE_VERSION,
            "ready": self._ready,
            # the operator turns it into the pod's deletion cost: scale-down removes pods without refs first
            "session_refs": self.refs.count,
        }

    # -- lifecycle ----------

    async def serve(self, addr: str | None = None) -> None:
        """Bind (``addr`` overrides ``config.grpc_addr``) and serve until ``stop()`` or cancellation."""
        await self.start(addr)
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def start(self, addr: str | None = None) -> None:
        if self._consumed:
            raise ServerConsumedError("server already consumed by serve()")
        self._consumed = True
        cfg = self.config
        if addr is not None:
            cfg.grpc_addr = addr
        for a in (cfg.grpc_addr, cfg.plaintext_grpc_addr, cfg.http_addr):
            if a is not None:
                split_host_port(a)
        self.runtime = compose(self)
        hooks = combine(self.runtime.hooks, self.hooks)
        self._hooks = hooks
        workers = cfg.sync_step_workers or default_workers(cfg.max_concurrent_workflows)
        # Steps still running after their run ended keep a slot of the concurrency limit (executor.py).
        self._executor = StepExecutor(workers, slots=self.runtime.limiter)
        self.service.executor = self._executor
        await self._prepare(hooks)
        # The admin port binds before the user's code is imported: a model load that takes minutes reads as
        # alive and "starting" (/healthz 200, /readyz 503) to the kubelet, not as a dead container.
        if hooks.admin_app_factory is not None and cfg.admin_addr is not None:
            admin = hooks.admin_app_factory(self)
            self.admin_port = await self._start_app(admin, cfg.admin_addr, None, "admin")
            self._admin_runner = self._runners.pop()
        if cfg.entrypoint:
            await self._load_entrypoint(cfg.entrypoint)

        age = cfg.grpc_max_connection_age_secs
        server = create_grpc_server(
            self._grpc_methods(main=True),
            wrap=hooks.grpc_method_wrapper,
            options=hooks.grpc_options,
            setup=hooks.grpc_server_setup,
            max_connection_age_secs=age,
        )
        if cfg.grpc_addr is not None:
            self._grpc_servers.append(server)
        try:
            if cfg.grpc_addr is not None:
                self.grpc_port = self._bind_main(server, cfg.grpc_addr, hooks)
            if cfg.plaintext_grpc_addr is not None:
                # Its own grpc.aio server: handlers cannot tell which port a call came in on, and this one
                # answers without the token check.
                plain = create_grpc_server(
                    self._grpc_methods(main=False),
                    wrap=hooks.plaintext_grpc_method_wrapper,
                    options=hooks.grpc_options,
                    setup=hooks.grpc_server_setup,
                    max_connection_age_secs=age,
                )
                self._grpc_servers.append(plain)
                self.plaintext_grpc_port = plain.add_insecure_port(cfg.plaintext_grpc_addr)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC listener: {exc}") from exc

        if cfg.forward_peers or cfg.forward_dns:
            own = [p for p in (self.grpc_port, self.plaintext_grpc_port) if p]
            self._forwarder = SiblingForwarder(
                static_peers=cfg.forward_peers,
                dns_name=cfg.forward_dns,
                own_ports=own,
                dns_port=self.grpc_port or 50051,
                credentials=hooks.forward_channel_credentials,
                metadata=hooks.forward_metadata,
                options=hooks.forward_channel_options,
            )
            self.service.forwarder = self._forwarder

        for srv in self._grpc_servers:
            await srv.start()
        log.info("gRPC listening on %s (port %s)", cfg.grpc_addr, self.grpc_port)

        if cfg.http_addr is not None:
            app = create_http_app(
                self._http_service(),
                middlewares=hooks.http_middlewares,
                max_body_bytes=cfg.http_max_body_bytes,
                body_stall_secs=cfg.idle_timeout_secs,
            )
            for setup in hooks.http_app_setup:
                setup(app)
            ssl_ctx = hooks.http_ssl_context() if hooks.http_ssl_context else None
            self.http_port = await self._start_app(app, cfg.http_addr, ssl_ctx, "HTTP/JSON shim")
            log.info("HTTP/JSON shim listening on %s (port %s)", cfg.http_addr, self.http_port)

        self._sweeper = asyncio.ensure_future(self._sweep_refs())
        self._ready = True
        for cb in hooks.on_ready:
            await _maybe_await(cb(self))

    async def _load_entrypoint(self, entrypoint: str) -> None:
        """Import the user's steps in a worker thread, so the admin port keeps answering while a slow import
        (model weights, CUDA initialisation) runs."""
        try:
            registry = await asyncio.to_thread(load_entrypoint, entrypoint, self._given_registry)
        except Exception as exc:  # the entrypoint's own import or registration failed
            raise EntrypointError(
                f"cannot load --entrypoint {entrypoint}: {type(exc).__name__}: {exc}"
            ) from exc
        self.registry = self.service.registry = registry
        log.info("node %s serving steps %s", self.node_id, ", ".join(self.served_step_ids) or "<none>")

    # -- what a second server kind (blazen_peer.router) replaces ----------

    async def _prepare(self, hooks: ServerHooks) -> None:
        """Called in ``start()`` once the runtime's parts are built, before any listener binds."""

    def _grpc_methods(self, *, main: bool) -> dict[str, grpc.RpcMethodHandler]:
        """The gRPC methods of ``--grpc-addr`` (``main``) and of ``--plaintext-grpc-addr``: the BlazenPeer
        service; the fleet's methods only on the authenticated listener."""
        methods = peer_methods(self.service)
        if main:
            assert self.runtime is not None
            guard = self.runtime.fleet_guard.why_refused
            methods.update(fleet_methods(self.describe, self.remote_runs, guard))
        return methods

    def _bind_main(self, server: grpc.aio.Server, addr: str, hooks: ServerHooks) -> int:
        """Binds ``--grpc-addr`` (TLS when configured) to the main gRPC server; the port."""
        creds = hooks.grpc_server_credentials() if hooks.grpc_server_credentials else None
        if creds is not None:
            return int(server.add_secure_port(addr, creds))
        return int(server.add_insecure_port(addr))

    async def _stop_data_plane(self, grace: float) -> None:
        """Called in ``stop()`` beside the gRPC servers' stop: whatever else serves calls closes within
        ``grace``."""

    def _http_service(self) -> Any:
        """What the HTTP/JSON shim calls (``invoke``, ``deref``, ``release`` on decoded messages)."""
        return self.service

    async def _close(self) -> None:
        """Called in ``stop()`` once the listeners are closed."""
        if self._forwarder is not None:
            await self._forwarder.close()
        if self._executor is not None:
            self._executor.shutdown()

    def describe(self) -> Description:
        """The ``blazen.fleet.v1.Fleet/Describe`` reply: what this peer serves, for a router."""
        reg = self.registry
        served = self.served_step_ids
        steps = {sid: spec.accepts for sid in served if (spec := reg.get(sid)) is not None}
        workflows = {w: tuple(ids) for w, ids in reg.workflows().items() if all(i in steps for i in ids)}
        in_flight = self.runtime.limiter.in_use if self.runtime is not None else 0
        run_steps = self.runtime is not None and self.runtime.fleet_guard.configured
        deltas = run_steps and self.remote_runs.state_budget > 0
        return Description(self.node_id, steps, workflows, in_flight, self._ready, run_steps, deltas)

    async def _start_app(self, app: web.Application, addr: str, ssl_ctx: Any, name: str) -> int:
        cfg = self.config
        host, port = split_host_port(addr)
        runner = make_runner(app, idle_timeout=cfg.idle_timeout_secs)
        await runner.setup()
        site = GuardedSite(
            runner,
            host or None,
            port,
            ssl_context=ssl_ctx,
            max_connections=cfg.connection_cap(),
            handshake_timeout=cfg.idle_timeout_secs,
            name=name,
        )
        await site.start()
        self._runners.append(runner)
        addresses = runner.addresses
        return addresses[0][1] if addresses else port

    async def _sweep_refs(self) -> None:
        while True:
            await asyncio.sleep(15)
            dropped = self.refs.sweep()
            if dropped:
                log.info("dropped %d expired session refs", dropped)
            abandoned = self.remote_runs.sweep()
            if abandoned:
                log.warning("ended %d split runs their router never ended", abandoned)

    async def stop(self, grace: float | None = None) -> None:
        """Stop within ``grace`` seconds (``--shutdown-grace-secs``): the ``on_stop`` hooks (the drain: not
        ready, then the admit window), then the listeners close and in-flight calls get what is left of
        the grace (gRPC sends GOAWAY so clients reconnect elsewhere; the HTTP shim closes idle keep-alive
        connections and lets running requests finish), then whatever still runs is cancelled. While session
        refs are held the gRPC listeners stay open for deref/release until they are gone or the grace is
        over. The admin listener closes last: probes and metrics answer until the end."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._ready = False
        loop = asyncio.get_running_loop()
        grace = self.config.shutdown_grace_secs if grace is None else grace
        self.stop_grace = grace
        deadline = loop.time() + grace
        try:
            for cb in self._hooks.on_stop:
                await _maybe_await(cb(self))
            if self._sweeper is not None:
                self._sweeper.cancel()
            remaining = max(0.0, deadline - loop.time())
            http = asyncio.gather(*(_close_app(runner, remaining) for runner in self._runners))
            # Session refs live only in this process: while it holds any, the gRPC listeners stay open until
            # the grace ends, so callers and siblings (forwarding) can still deref and release them (new
            # sub-workflows are refused meanwhile). A pod without refs closes at once. (Polled: the store
            # has no change event, and this runs once, at shutdown.)
            while self.refs.count > 0 and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(min(0.1, deadline - loop.time()))
            remaining = max(0.0, deadline - loop.time())
            await asyncio.gather(
                http, self._stop_data_plane(remaining), *(srv.stop(remaining) for srv in self._grpc_servers)
            )
            for cb in self._hooks.on_closed:
                await _maybe_await(cb(self))
            if self._admin_runner is not None:
                await self._admin_runner.cleanup()
            await self._close()
        finally:
            self._stopped.set()


async def _close_app(runner: web.AppRunner, grace: float) -> None:
    """Close an aiohttp app within ``grace`` seconds: no new connections, idle keep-alive connections closed,
    running requests get ``grace`` seconds and are then cancelled (``cleanup()`` alone allows 60 s)."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
        await runner.server.shutdown(grace)
    await runner.cleanup()


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        with contextlib.suppress(asyncio.CancelledError):
            await value
