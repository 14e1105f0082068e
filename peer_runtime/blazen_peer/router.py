"""``BlazenRouterServer``: ``blazen-peer route``, one endpoint for several pools of peers (docs/router.md).

The same server as a peer - the composition root builds its TLS (hot reload), token, CORS, admission,
limits, health, metrics, drain and logging from the same ``PeerConfig`` - with other methods behind the
listeners: the BlazenPeer calls are forwarded to the pools (``routing.forward``) instead of run here. It
runs no user code and holds no session refs (its ref store stays empty, so its drain never waits for
any). The hop to the pools uses the session-ref forwarding credentials (the router's own certificate as
client identity with its CA, and its token) unless ``--pool-tls-*`` / ``--pool-token-file`` give it its
own, which follow their files like the serving ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from typing import Any

import grpc

from ._relay import Relay
from .config import PeerConfig
from .engine.registry import StepRegistry
from .hooks import ServerHooks
from .pki.reload import ReloadingTlsSource
from .pki.tls import TlsMaterial, system_roots_pem
from .routing.discovery import FleetDiscovery, KubeAccess, kube_access
from .routing.forward import Router, RouterService, router_methods
from .routing.kube import KubeApi
from .routing.pools import PoolSet
from .routing.relay import METADATA, RelayPolicy
from .routing.split import SplitRunner
from .routing.table import parse_pool
from .security.policy import pool_hop_tls, pool_hop_tokens
from .server import BlazenPeerServer
from .transport.channels import TARGET_NAME_OPTION
from .transport.grpc_server import GRPC_RECEIVE_LIMIT
from .wire.protocol import PATH_INVOKE, PATH_STREAM

log = logging.getLogger("blazen_peer.router")

__all__ = ["BlazenRouterServer", "parse_pools", "pool_source"]

#: how long a starting router waits for its first list of the fleet before it listens anyway (not ready)
FIRST_SYNC_SECS = 10.0


def parse_pools(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """``--pool`` values -> pool name -> replica addresses; a name given twice is an error."""
    pools: dict[str, list[str]] = {}
    for spec in specs:
        name, addrs = parse_pool(spec)
        if name in pools:
            raise ValueError(f"pool {name!r} is given twice")
        pools[name] = addrs
    if not pools:
        raise ValueError("at least one --pool NAME=HOST:PORT[,HOST:PORT...] is required")
    return pools


def pool_source(config: PeerConfig) -> dict[str, list[str]] | KubeAccess:
    """The static pools (``--pool``) or where to discover them (``--fleet``): exactly one of the two."""
    if config.fleet is not None:
        if config.pool:
            raise ValueError("--pool and --fleet are mutually exclusive: give static pools or a fleet")
        if not config.fleet.strip():
            raise ValueError("--fleet: empty")
        return kube_access(
            config.fleet.strip(),
            namespace=config.fleet_namespace,
            url=config.kube_api_url,
            token_file=config.kube_token_file,
            ca_file=config.kube_ca,
        )
    if not config.pool:
        raise ValueError(
            "one of --pool NAME=HOST:PORT[,HOST:PORT...] or --fleet NAME (pools from the Kubernetes API) is "
            "required"
        )
    return parse_pools(config.pool)


class BlazenRouterServer(BlazenPeerServer):
    def __init__(self, config: PeerConfig | None = None, *, hooks: ServerHooks | None = None) -> None:
        if config is not None and (config.entrypoint or config.steps is not None):
            raise ValueError("a router runs no steps: no entrypoint, no --steps")
        super().__init__(config=config, registry=StepRegistry(), hooks=hooks)
        source = pool_source(self.config)
        self.kube = source if isinstance(source, KubeAccess) else None
        self.pool_addrs = {} if isinstance(source, KubeAccess) else source
        self.discovery: FleetDiscovery | None = None
        self._unready: list[str] = []
        self.pools: PoolSet | None = None
        self.router: Router | None = None
        self.split: SplitRunner | None = None
        self._hop_tls: ReloadingTlsSource | None = None
        #: the TLS server name of the hop when no pool has its own (``--pool-server-name``, else ours)
        self._hop_options: Any = None
        #: ``--data-plane relay``: the relay on ``--grpc-addr``, the grpcio server behind it on a unix socket
        #: in a private directory
        self.relay: Relay | None = None
        self.relay_policy: RelayPolicy | None = None
        self._relay_dir: str | None = None

    async def _prepare(self, hooks: ServerHooks) -> None:
        assert self.runtime is not None
        options = hooks.forward_channel_options
        name = self.config.pool_server_name
        if name:

            def options() -> list[tuple[str, Any]]:
                return [(TARGET_NAME_OPTION, name)]

        self._hop_options = options
        metadata = hooks.forward_metadata
        hop_tokens = pool_hop_tokens(self.config)
        if hop_tokens is not None:
            metadata = hop_tokens.metadata
            self.runtime.outgoing_tokens.append(hop_tokens)
        credentials = hooks.forward_channel_credentials
        self._hop_tls = pool_hop_tls(self.config)
        if self._hop_tls is not None:
            credentials = self._hop_tls.grpc_channel_credentials
            self.runtime.metrics.track_tls(self._hop_tls, "pool-hop")
            loop = asyncio.get_running_loop()

            def on_reload(material: TlsMaterial) -> None:  # the polling thread
                # new calls open channels with the new identity; running ones finish on the old channels
                loop.call_soon_threadsafe(self.reset_forwarding)

            self._hop_tls.add_listener(on_reload)
        self.pools = PoolSet(
            self.pool_addrs,
            credentials=credentials,
            metadata=metadata,
            options=options,
            refresh_secs=self.config.pool_refresh_secs,
            on_refresh=self._pools_refreshed,
        )
        self.router = Router(self.pools)
        # step ids no single pool serves: the router runs the events itself, each step on its pool
        self.split = self.router.split = SplitRunner(self.router, self.runtime.fleet_router_token)
        self.runtime.metrics.add_collector(self.pools.collect)
        self.runtime.metrics.add_collector(self.split.collect)
        if self.kube is not None:
            await self._start_discovery(self.kube)
        # Routable from the first call: the listeners bind once every replica answered or failed.
        await self.pools.refresh()
        self.pools.start()
        if self._hop_tls is not None:
            self._hop_tls.start()

    async def _start_discovery(self, kube: KubeAccess) -> None:
        assert self.runtime is not None
        assert self.pools is not None
        api = KubeApi(kube.url, token_file=kube.token_file, ca_file=kube.ca_file)
        pools = self.pools
        # Each pool's replicas are checked against their own BlazenPeer's name, unless --pool-server-name
        # gives one name for all.
        per_pool = self.config.pool_server_name is None

        def on_pools(addrs: dict[str, list[str]], names: dict[str, str]) -> None:
            pools.update(addrs, names if per_pool else None)

        self.discovery = FleetDiscovery(
            api, kube.namespace, kube.fleet, on_pools, watch_secs=self.config.kube_watch_secs
        )
        self.runtime.metrics.add_collector(self.discovery.collect)
        self.discovery.start()
        # Listen with the fleet known when the API answers; when it does not, listen anyway, not ready.
        if not await self.discovery.wait_synced(FIRST_SYNC_SECS):
            log.warning("%s; listening, not ready until it is", self.discovery.not_ready_reason())
            self._update_readiness()

    def _pools_refreshed(self, unready: list[str]) -> None:
        self._unready = unready
        self._update_readiness()

    def _update_readiness(self) -> None:
        # Not ready while a pool has no live replica: a Service in front of several routers then sends
        # callers to one that can serve every pool. A discovered pool with no endpoint at all (scaled to
        # zero) does not count: every router sees it so, and none being ready would only cut off the others.
        assert self.runtime is not None
        assert self.pools is not None
        reason = self.discovery.not_ready_reason() if self.discovery is not None else None
        if reason is None:
            empty = set(self.pools.empty_pools()) if self.discovery is not None else set()
            blocking = [p for p in self._unready if p not in empty]
            reason = f"pools without a live replica: {', '.join(blocking)}" if blocking else None
        self.runtime.readiness.set_blocker(reason)

    # -- the data plane (docs/router.md) ----------
    def _bind_main(self, server: grpc.aio.Server, addr: str, hooks: ServerHooks) -> int:
        """``--data-plane relay``: the relay owns ``--grpc-addr`` (the same TLS, client certificates, cap,
        handshake timeout and maximum connection age as grpcio's listener) and forwards Invoke and Stream
        itself; the grpcio server answers the rest on a unix socket only this process can open."""
        if self.config.data_plane != "relay":
            return super()._bind_main(server, addr, hooks)
        assert self.runtime is not None
        assert self.router is not None
        assert self.pools is not None
        rt, cfg = self.runtime, self.config
        # mkdtemp: a directory only this user can enter, so nobody else can connect to the socket
        self._relay_dir = tempfile.mkdtemp(prefix="blazen-router-")
        sock = os.path.join(self._relay_dir, "grpc.sock")
        server.add_insecure_port(f"unix:{sock}")
        assert rt.admission is not None
        relayed = [PATH_INVOKE, PATH_STREAM]
        gates = {p: rt.admission.call_gate(p) for p in relayed}
        policy = self.relay_policy = RelayPolicy(self.router, gates, self._hop_server_name)
        tls = rt.tls
        mutual = rt.tls_client_auth == "require"
        hop = self._hop_tls if self._hop_tls is not None else tls
        self.relay = Relay(
            policy,
            relayed,
            sock,
            metadata=METADATA,
            tls=_serving(tls.material, mutual) if tls is not None else None,
            hop_tls=_hop(hop.material) if hop is not None else None,
            max_connections=cfg.connection_cap(),
            handshake_timeout=cfg.idle_timeout_secs,
            max_connection_age=cfg.grpc_max_connection_age_secs,
            max_request_bytes=GRPC_RECEIVE_LIMIT,
        )
        relay = self.relay
        if tls is not None:
            # the polling thread: new handshakes take the new material
            tls.add_listener(lambda m: relay.set_tls(*_serving(m, mutual)))
        if hop is not None:
            hop.add_listener(lambda m: relay.set_hop_tls(_hop(m)))
        return relay.start(addr)

    def _hop_server_name(self, addr: str) -> str | None:
        assert self.pools is not None
        name = self.pools.server_name(addr)
        if name is None and self._hop_options is not None:
            name = dict(self._hop_options()).get(TARGET_NAME_OPTION)
        return name

    async def _stop_data_plane(self, grace: float) -> None:
        if self.relay is not None:
            await asyncio.to_thread(self.relay.stop, grace)

    def _grpc_methods(self, *, main: bool) -> dict[str, grpc.RpcMethodHandler]:
        assert self.router is not None
        return router_methods(self.router)

    def _http_service(self) -> Any:
        assert self.router is not None
        return RouterService(self.router)

    async def _close(self) -> None:
        await super()._close()
        if self._relay_dir is not None:
            shutil.rmtree(self._relay_dir, ignore_errors=True)
        if self._hop_tls is not None:
            self._hop_tls.stop()
        if self.discovery is not None:
            await self.discovery.close()
        if self.pools is not None:
            await self.pools.close()

    def reset_forwarding(self) -> None:
        super().reset_forwarding()
        if self.pools is not None:
            self.pools.reset_channels()

    @property
    def served_step_ids(self) -> list[str]:
        return sorted(self.pools.table.step_pools) if self.pools is not None else []

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["router"] = self.pools.info() if self.pools is not None else None
        if out["router"] is not None and self.split is not None:
            out["router"]["split"] = self.split.info()
        if out["router"] is not None and self.discovery is not None:
            out["router"]["discovery"] = self.discovery.info()
        return out


def _serving(material: TlsMaterial, mutual: bool) -> tuple[bytes, bytes, bytes | None]:
    """The relay listener's PEM: with ``mutual``, the CA client certificates must chain to."""
    assert material.cert_chain_pem is not None
    assert material.private_key_pem is not None
    return material.cert_chain_pem, material.private_key_pem, material.ca_pem if mutual else None


def _hop(material: TlsMaterial) -> tuple[bytes | None, bytes | None, bytes]:
    """The hop's PEM: our identity and whom the pools' certificates chain to (the system roots without a
    CA bundle, as for grpcio's channels)."""
    return material.cert_chain_pem, material.private_key_pem, material.ca_pem or system_roots_pem()
