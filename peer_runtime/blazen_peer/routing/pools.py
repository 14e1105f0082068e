"""The pools a router forwards to: their replicas, one pooled gRPC channel per replica, and what each
serves, learned from the replicas themselves (``blazen.fleet.v1.Fleet/Describe``) every
``--pool-refresh-secs``, at once after a replica refused a call, and at once for a replica that joins.

Pools and replicas come and go at runtime (``update``, from Kubernetes discovery): a replica whose address
stays keeps its object (its in-flight count, its channel, its description); one that leaves is no longer
chosen, and its channel closes once the calls running on it have ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..transport.channels import ChannelPool
from ..wire.envelope import unwrap
from ..wire.fleet import Description, DescriptionError
from ..wire.protocol import PATH_DESCRIBE
from .balance import Replica
from .table import PoolView, RoutingTable

__all__ = ["PoolSet"]

log = logging.getLogger("blazen_peer.routing")

#: how long a replica that refused a call, or failed to describe itself, is avoided (unless nothing else is
#: left); a successful Describe clears it sooner.
DOWN_SECS = 5.0
#: how long calls running on a replica that left the pools may go on before its channel closes under them
LEFT_GRACE_SECS = 3600.0


class PoolSet:
    def __init__(
        self,
        pools: Mapping[str, list[str]],
        *,
        credentials: Callable[[], grpc.ChannelCredentials | None] | None = None,
        metadata: Callable[[], list[tuple[str, str]]] | None = None,
        options: Callable[[], list[tuple[str, Any]]] | None = None,
        refresh_secs: float = 10.0,
        describe_timeout: float = 5.0,
        on_refresh: Callable[[list[str]], None] | None = None,
    ) -> None:
        """``on_refresh(unready_pools)`` after every refresh, with the pools that have no live replica."""
        self.pools: dict[str, list[Replica]] = {
            name: [Replica(name, a) for a in addrs] for name, addrs in pools.items()
        }
        self.replicas = [r for rs in self.pools.values() for r in rs]
        self.by_addr = {r.addr: r for r in self.replicas}
        self._metadata = metadata
        #: pool -> the name its replicas' certificates are checked against (discovered pools), else the
        #: name in ``options()``
        self.server_names: dict[str, str] = {}
        self.channels = ChannelPool(credentials=credentials, options=options, server_name=self.server_name)
        self.refresh_secs = refresh_secs
        self.describe_timeout = describe_timeout
        self._on_refresh = on_refresh
        self.table = RoutingTable()
        self.refreshed_at: float | None = None
        self._wake = asyncio.Event()
        #: the loop the refreshes run on, once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        #: describing replicas that joined
        self._background: set[asyncio.Future[Any]] = set()

    # -- channels ----------
    def server_name(self, addr: str) -> str | None:
        """The name ``addr``'s certificate is checked against when its pool was discovered with one."""
        r = self.by_addr.get(addr)
        return self.server_names.get(r.pool) if r is not None else None

    def channel(self, addr: str) -> grpc.aio.Channel:
        return self.channels.get(addr)

    def metadata(self) -> list[tuple[str, str]]:
        """What every call to a pool carries (the token)."""
        return self._metadata() if self._metadata is not None else []

    def reset_channels(self) -> None:
        """New calls open new channels (a reloaded client certificate). Call on the event loop."""
        self.channels.reset()

    # -- descriptions ----------
    async def _describe(self, replica: Replica) -> None:
        try:
            call = self.channel(replica.addr).unary_unary(PATH_DESCRIBE)
            raw = await call(b"", metadata=self.metadata(), timeout=self.describe_timeout)
            desc = Description.decode(unwrap(raw))
        except (grpc.aio.AioRpcError, DescriptionError, ValueError) as exc:
            detail = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else exc
            if replica.description is not None or replica.down_until == 0.0:
                log.warning(
                    "pool %s: replica %s did not describe itself: %s", replica.pool, replica.addr, detail
                )
            replica.down_until = time.monotonic() + DOWN_SECS
            replica.live = False
            return
        replica.description = desc
        replica.live = desc.ready
        # A replica that is not ready (draining, starting) is avoided, not forgotten: its refs live on.
        replica.down_until = 0.0 if desc.ready else time.monotonic() + DOWN_SECS

    async def refresh(self) -> None:
        """Ask every replica at once, then rebuild the routing table from those that answered."""
        await asyncio.gather(*(self._describe(r) for r in self.replicas))
        self._rebuild()
        self.refreshed_at = time.time()

    def _rebuild(self) -> None:
        """The routing table from the current pools' descriptions; then ``on_refresh``. A pool none of whose
        replicas has described itself yet keeps its last view: in a rolling update its pods can all be new
        for a moment, and until they answer the pool still serves what it served (a call to a step it no
        longer serves gets the replica's own NOT_FOUND), rather than the router calling the step unknown."""
        views = []
        for name, replicas in self.pools.items():
            described = [r.description for r in replicas if r.description is not None]
            if not described and name in self.table.views:
                views.append(self.table.views[name])
                continue
            steps: dict[str, tuple[str, ...]] = {}
            workflows: dict[str, tuple[str, ...]] = {}
            for d in described:
                steps.update(d.steps)
                workflows.update(d.workflows)
            views.append(PoolView(name, steps, workflows))
        self.table = RoutingTable(views)
        if self._on_refresh is not None:
            self._on_refresh(self.unready_pools())

    def unready_pools(self) -> list[str]:
        """The pools none of whose replicas answered its last Describe as ready (or that have none)."""
        return [name for name, replicas in self.pools.items() if not any(r.live for r in replicas)]

    def empty_pools(self) -> list[str]:
        """The pools without a single replica (a discovered pool with no ready endpoint)."""
        return [name for name, replicas in self.pools.items() if not replicas]

    # -- membership ----------
    def update(self, pools: Mapping[str, list[str]], server_names: Mapping[str, str] | None = None) -> None:
        """The pools are now ``pools`` (name -> replica addresses); ``server_names``: pool -> the name its
        replicas' certificates are checked against. Call on the event loop."""
        if server_names is not None:
            self.server_names = dict(server_names)
        old = self.by_addr
        new: dict[str, list[Replica]] = {}
        for name, addrs in pools.items():
            replicas = []
            for addr in dict.fromkeys(addrs):
                r = old.get(addr)
                if r is None or r.pool != name:
                    r = Replica(name, addr)
                replicas.append(r)
            new[name] = replicas
        self.pools = new
        self.replicas = [r for rs in new.values() for r in rs]
        self.by_addr = {r.addr: r for r in self.replicas}
        left = [r for a, r in old.items() if self.by_addr.get(a) is not r]
        joined = [r for a, r in self.by_addr.items() if old.get(a) is not r]
        for r in left:
            r.down_until = math.inf  # a call that picked it before it left and retries goes elsewhere
            if r.addr not in self.by_addr:  # (else the address stays, in another pool: same channel)
                self.channels.discard(r.addr, grace=LEFT_GRACE_SECS)
        self._rebuild()
        if joined:
            self._spawn(self._describe_joined(joined))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _describe_joined(self, joined: list[Replica]) -> None:
        # At once, not at the next refresh: a replica that joins gets calls within moments.
        await asyncio.gather(*(self._describe(r) for r in joined))
        self._rebuild()

    def refresh_soon(self) -> None:
        """Refresh now rather than at the next period; from any thread (the relay calls it from its own)."""
        if self._loop is None:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_secs)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the refreshes
                log.exception("refreshing the pool descriptions failed")

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        for task in [self._task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.channels.close()

    # -- observability ----------
    def info(self) -> dict[str, Any]:
        """The pools and the routing table, for ``/v1/info``."""
        now = time.monotonic()
        pools: dict[str, Any] = {}
        for name, replicas in self.pools.items():
            view = self.table.views.get(name)
            pools[name] = {
                "steps": sorted(view.steps) if view else [],
                "workflows": {w: list(ids) for w, ids in sorted(view.workflows.items())} if view else {},
                "replicas": [
                    {
                        "addr": r.addr,
                        "node_id": r.description.node_id if r.description else None,
                        "up": r.up(now),
                        "live": r.live,
                        "in_flight": r.in_flight,
                        "reported_in_flight": r.description.in_flight if r.description else None,
                        "calls": r.calls,
                        "errors": r.errors,
                        "retries": r.retries,
                    }
                    for r in replicas
                ],
            }
        return {
            "pools": pools,
            "unready_pools": self.unready_pools(),
            "routes": self.table.routes(),
            "refreshed_at": self.refreshed_at,
        }

    def collect(self) -> Iterator[Metric]:
        """Per pool and replica: calls in flight, calls, errors, retries, up (a ``PeerMetrics`` collector)."""
        labels = ["pool", "replica"]
        in_flight = GaugeMetricFamily(
            "blazen_router_replica_in_flight_calls",
            "Calls the router has running on a replica.",
            labels=labels,
        )
        calls = CounterMetricFamily(
            "blazen_router_replica_calls", "Calls forwarded to a replica.", labels=labels
        )
        errors = CounterMetricFamily(
            "blazen_router_replica_errors", "Forwarded calls that ended with a non-OK status.", labels=labels
        )
        retries = CounterMetricFamily(
            "blazen_router_replica_retries",
            "Calls a replica refused before running anything, sent to another replica.",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "blazen_router_replica_up", "1 when the replica is chosen for calls.", labels=labels
        )
        pool_ready = GaugeMetricFamily(
            "blazen_router_pool_ready", "1 when a replica of the pool is live.", labels=["pool"]
        )
        pool_replicas = GaugeMetricFamily(
            "blazen_router_pool_replicas", "The replicas the router knows in the pool.", labels=["pool"]
        )
        unready = set(self.unready_pools())
        for name, replicas in self.pools.items():
            pool_ready.add_metric([name], 0 if name in unready else 1)
            pool_replicas.add_metric([name], len(replicas))
        now = time.monotonic()
        for r in self.replicas:
            key = [r.pool, r.addr]
            in_flight.add_metric(key, r.in_flight)
            calls.add_metric(key, r.calls)
            errors.add_metric(key, r.errors)
            retries.add_metric(key, r.retries)
            up.add_metric(key, 1 if r.up(now) else 0)
        yield from (in_flight, calls, errors, retries, up, pool_ready, pool_replicas)
