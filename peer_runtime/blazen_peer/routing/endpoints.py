"""A fleet's pools from the Kubernetes objects that describe it: pure functions, no I/O.

The pools are the fleet's BlazenPeers (pool name = their ``blazen.dev/pool`` label); a pool's replicas are the
endpoints of its EndpointSlices (the same label) that are ready - ``conditions.ready`` unset counts as ready,
as the API defines it - and not terminating, each at its first address and the slice's port named ``grpc``,
once however many slices list it (both of a BlazenPeer's Services select the same pods). A pool's replicas
prove who they are with their BlazenPeer's certificate, which names its Service ``<peer>.<namespace>.svc``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "FLEET_LABEL",
    "GRPC_PORT_NAME",
    "POOL_LABEL",
    "fleet_pools",
    "fleet_selector",
    "pool_server_names",
    "slice_addresses",
]

FLEET_LABEL = "blazen.dev/fleet"
POOL_LABEL = "blazen.dev/pool"
GRPC_PORT_NAME = "grpc"


def fleet_selector(fleet: str) -> str:
    """The label selector of a fleet's BlazenPeers and EndpointSlices."""
    return f"{FLEET_LABEL}={fleet}"


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    return labels if isinstance(labels, Mapping) else {}


def _pool(obj: Mapping[str, Any]) -> str | None:
    pool = _labels(obj).get(POOL_LABEL)
    return pool if isinstance(pool, str) and pool else None


def _grpc_port(slice_: Mapping[str, Any]) -> int | None:
    ports = slice_.get("ports")
    for port in ports if isinstance(ports, list) else ():
        if isinstance(port, Mapping) and port.get("name") == GRPC_PORT_NAME:
            number = port.get("port")
            if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 65536:
                return number
    return None


def _host(address: str) -> str | None:
    """``address`` as the host part of ``host:port``: IPv6 in brackets; None when it is not an address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _serving(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions")
    if not isinstance(conditions, Mapping):
        conditions = {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def slice_addresses(slice_: Mapping[str, Any]) -> list[str]:
    """The ``host:port`` of the ready, non-terminating endpoints of one EndpointSlice."""
    port = _grpc_port(slice_)
    endpoints = slice_.get("endpoints")
    if port is None or not isinstance(endpoints, list):
        return []
    out = []
    for ep in endpoints:
        if not isinstance(ep, Mapping) or not _serving(ep):
            continue
        addresses = ep.get("addresses")
        if not isinstance(addresses, list) or not addresses or not isinstance(addresses[0], str):
            continue
        host = _host(addresses[0])
        if host is not None:
            out.append(f"{host}:{port}")
    return out


def fleet_pools(
    peers: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]]
) -> dict[str, list[str]]:
    """pool name -> its replicas' ``host:port`` (sorted, unique); every pool a BlazenPeer names is there,
    with no replica when none serves. Slices of a pool no BlazenPeer names (a deleted one's leftovers
    until the garbage collector gets them) are ignored."""
    pools: dict[str, set[str]] = {p: set() for peer in peers if (p := _pool(peer)) is not None}
    for s in slices:
        pool = _pool(s)
        if pool in pools:
            pools[pool].update(slice_addresses(s))
    return {name: sorted(addrs) for name, addrs in sorted(pools.items())}


def pool_server_names(peers: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """pool name -> the name its replicas' certificates are checked against: the BlazenPeer's Service,
    ``<peer>.<namespace>.svc`` (one of the names the operator puts in every BlazenPeer's certificate)."""
    out: dict[str, str] = {}
    for peer in peers:
        pool = _pool(peer)
        meta = peer.get("metadata")
        if pool is None or not isinstance(meta, Mapping):
            continue
        name, namespace = meta.get("name"), meta.get("namespace")
        if isinstance(name, str) and name and isinstance(namespace, str) and namespace:
            out[pool] = f"{name}.{namespace}.svc"
    return dict(sorted(out.items()))
