"""``FleetDiscovery``: a fleet's pools and their ready endpoints, from two watches on the Kubernetes API (the
fleet's BlazenPeers and its EndpointSlices, ``kube.ResourceWatch``), handed to the ``PoolSet`` on every
change (``endpoints.fleet_pools``).

Fail static: while the API is unreachable or a watch is stalled the pools keep the endpoints last known -
the routers keep routing, which is what a fleet wants when only its control plane is down - and the state
shows in ``/v1/info`` and ``/metrics``. Until both watches have listed once, nothing is known: the router is
not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .endpoints import fleet_pools, fleet_selector, pool_server_names
from .kube import KubeApi, ResourceWatch

__all__ = ["FleetDiscovery", "KubeAccess", "kube_access"]

log = logging.getLogger("blazen_peer.routing.discovery")

BLAZENPEERS = "/apis/blazen.dev/v1alpha1/namespaces/{ns}/blazenpeers"
ENDPOINTSLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class KubeAccess:
    """Where the fleet is and how to reach the API, defaults resolved (``kube_access``)."""

    fleet: str
    namespace: str
    url: str
    token_file: str | None
    ca_file: str | None


def kube_access(
    fleet: str,
    *,
    namespace: str | None,
    url: str | None,
    token_file: str | None,
    ca_file: str | None,
    environ: Mapping[str, str] | None = None,
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
) -> KubeAccess:
    """The flags, with the in-cluster defaults for those not given (the service account's files, the
    ``KUBERNETES_SERVICE_*`` env); ``ValueError`` naming the flag when a default is not there either."""
    env = os.environ if environ is None else environ
    if namespace is None:
        try:
            namespace = (sa_dir / "namespace").read_text().strip()
        except OSError:
            raise ValueError(
                f"--fleet-namespace is required outside a pod ({sa_dir / 'namespace'} is not there)"
            ) from None
    if url is None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ValueError("--kube-api-url is required outside a pod (no KUBERNETES_SERVICE_HOST/PORT)")
        url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"--kube-api-url must be an http(s):// URL, not {url!r}")
    if token_file is None:
        default = sa_dir / "token"
        if not default.exists():
            raise ValueError(f"--kube-token-file is required outside a pod ({default} is not there)")
        token_file = str(default)
    if ca_file is None and url.startswith("https://"):
        default = sa_dir / "ca.crt"
        if not default.exists():
            raise ValueError(f"--kube-ca is required outside a pod ({default} is not there)")
        ca_file = str(default)
    for flag, path in (("--kube-token-file", token_file), ("--kube-ca", ca_file)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag}: {path} is not a file")
    if not namespace:
        raise ValueError("--fleet-namespace: empty")
    return KubeAccess(fleet, namespace, url, token_file, ca_file)


class FleetDiscovery:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        fleet: str,
        on_pools: Callable[[dict[str, list[str]], dict[str, str]], None],
        *,
        watch_secs: int = 60,
    ) -> None:
        """``on_pools(pool -> addresses, pool -> server name)`` once both watches have listed, then after
        every change that alters them."""
        self.api = api
        self.namespace = namespace
        self.fleet = fleet
        self._on_pools = on_pools
        selector = fleet_selector(fleet)
        self.peers = ResourceWatch(
            api, BLAZENPEERS.format(ns=namespace), selector, self._changed, watch_secs=watch_secs
        )
        self.slices = ResourceWatch(
            api, ENDPOINTSLICES.format(ns=namespace), selector, self._changed, watch_secs=watch_secs
        )
        self.pools: dict[str, list[str]] | None = None
        self.server_names: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def watches(self) -> dict[str, ResourceWatch]:
        return {"blazenpeers": self.peers, "endpointslices": self.slices}

    @property
    def synced(self) -> bool:
        return self.peers.health.synced and self.slices.health.synced

    def _changed(self) -> None:
        if not self.synced:
            return
        pools = fleet_pools(self.peers.objects.values(), self.slices.objects.values())
        names = pool_server_names(self.peers.objects.values())
        if pools == self.pools and names == self.server_names:
            return
        if self.pools is None:
            log.info("fleet %s/%s: pools %s", self.namespace, self.fleet, _summary(pools))
        else:
            log.info("fleet %s/%s: pools now %s", self.namespace, self.fleet, _summary(pools))
        self.pools = pools
        self.server_names = names
        self._on_pools(pools, names)

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(w.run()) for w in (self.peers, self.slices)]

    async def wait_synced(self, limit: float) -> bool:
        """Wait up to ``limit`` seconds for both first lists; True when they are in."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(self.peers.synced.wait(), self.slices.synced.wait()), limit)
        return self.synced

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.api.close()

    def not_ready_reason(self) -> str | None:
        """Why the router cannot be ready on discovery's account: only before the first sync."""
        if self.synced:
            return None
        errors = [f"{n}: {w.health.last_error}" for n, w in self.watches.items() if w.health.last_error]
        detail = f" ({'; '.join(errors)})" if errors else ""
        return f"fleet {self.fleet} not listed from the Kubernetes API yet{detail}"

    # -- observability ----------
    def info(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "namespace": self.namespace,
            "api": self.api.base_url,
            "synced": self.synced,
            "watches": {
                name: {
                    "synced": w.health.synced,
                    "healthy": w.health.healthy,
                    "objects": len(w.objects),
                    "last_seen_at": w.health.last_seen_at,
                    "last_error": w.health.last_error,
                    "lists": w.health.lists,
                    "watches": w.health.watches,
                    "events": w.health.events,
                    "errors": w.health.errors,
                }
                for name, w in self.watches.items()
            },
        }

    def collect(self) -> Iterator[Metric]:
        labels = ["resource"]
        synced = GaugeMetricFamily(
            "blazen_router_discovery_synced",
            "1 once the resource was listed from the Kubernetes API.",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "blazen_router_discovery_healthy",
            "1 while the last list or watch request succeeded; 0 while retrying (the last known endpoints "
            "stay in use).",
            labels=labels,
        )
        last_seen = GaugeMetricFamily(
            "blazen_router_discovery_last_seen_timestamp_seconds",
            "When the API server last answered a list or sent a watch event (bookmarks included).",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "blazen_router_discovery_errors", "Failed list or watch requests.", labels=labels
        )
        lists = CounterMetricFamily(
            "blazen_router_discovery_lists", "Full lists (at start, after 410 Gone).", labels=labels
        )
        for name, w in self.watches.items():
            synced.add_metric([name], 1 if w.health.synced else 0)
            healthy.add_metric([name], 1 if w.health.healthy else 0)
            last_seen.add_metric([name], w.health.last_seen_at or 0)
            errors.add_metric([name], w.health.errors)
            lists.add_metric([name], w.health.lists)
        yield from (synced, healthy, last_seen, errors, lists)


def _summary(pools: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}={','.join(addrs) or '<none>'}" for name, addrs in pools.items()) or "<none>"
