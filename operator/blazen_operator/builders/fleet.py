"""Pure builders of a BlazenFleet's pools: one BlazenPeer per pool, spec = the fleet's fields overridden by
the pool's. The pools' own children come from the BlazenPeer builders when the operator reconciles those
BlazenPeers: a pool is a BlazenPeer, there is no second copy of the pod logic."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import fleet_spec as fs
from .. import spec as s
from ..kinds import MANAGED_BY, MANAGED_BY_LABEL
from . import common as c

# The last pools[].replicas the fleet applied to a pool's BlazenPeer: the fleet writes spec.replicas again
# only when this differs from the fleet's value, so `kubectl scale` and an HPA are not fought in between.
FLEET_REPLICAS_ANNOTATION = "blazen.dev/fleet-replicas"
DEFAULT_POOL_REPLICAS = 1


@dataclass(frozen=True)
class Fleet:
    """Everything the builders need about one BlazenFleet."""

    name: str
    namespace: str
    spec: fs.BlazenFleetSpec
    uid: str = c._NO_UID
    labels: dict[str, str] = field(default_factory=dict)
    operator: c.OperatorIdentity | None = None

    @classmethod
    def from_body(cls, body: Any, operator: c.OperatorIdentity | None = None) -> Fleet:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid") or c._NO_UID,
            labels=dict(meta.get("labels") or {}),
            spec=fs.parse_spec(body.get("spec")),
            operator=operator,
        )


def owner_reference(f: Fleet) -> dict[str, Any]:
    return {
        "apiVersion": s.API_VERSION,
        "kind": fs.KIND,
        "name": f.name,
        "uid": f.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def user_labels(f: Fleet) -> dict[str, str]:
    """The fleet's own labels, minus tooling prefixes (as a BlazenPeer's are passed to its children)."""
    return {k: v for k, v in sorted(f.labels.items()) if not k.startswith(c._NOT_PROPAGATED)}


def metadata(f: Fleet, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": f.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(f)],
    }


# ------------------------------------------------------------ names and labels


def pool_peer_name(f: Fleet, pool: str) -> str:
    return f"{f.name}-{pool}"


def router_name(f: Fleet) -> str:
    return f"{f.name}-router"


def router_selector(f: Fleet) -> dict[str, str]:
    return {"app.kubernetes.io/name": "blazen-router", "app.kubernetes.io/instance": f.name}


def fleet_labels(f: Fleet) -> dict[str, str]:
    """Every object of the fleet: its own labels, ours, and the fleet's name."""
    out = user_labels(f)
    out.update(
        {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/part-of": "blazen-fleet", fs.FLEET_LABEL: f.name}
    )
    return out


def router_labels(f: Fleet) -> dict[str, str]:
    return {**fleet_labels(f), **router_selector(f), fs.COMPONENT_LABEL: "router"}


def pool_labels(f: Fleet, pool: str) -> dict[str, str]:
    return {**fleet_labels(f), fs.POOL_LABEL: pool}


# ------------------------------------------------------------ pools


def pool_spec(f: Fleet, pool: fs.FleetPool) -> s.BlazenPeerSpec:
    """The pool's BlazenPeer spec: each inherited field is the pool's when set, else the fleet's; tls and auth
    are the fleet's; replicas the pool's. When the pool's NetworkPolicy names who may call it, the fleet's
    router is added: the router is every caller's way in."""
    fleet_fields = f.spec.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(fs.INHERITED))
    pool_fields = pool.model_dump(by_alias=True, exclude_none=True, mode="json", include=set(fs.INHERITED))
    merged: dict[str, Any] = {**fleet_fields, **pool_fields}
    merged["tls"] = f.spec.tls.dump()
    merged["auth"] = f.spec.auth.dump()
    merged["replicas"] = pool.replicas if pool.replicas is not None else DEFAULT_POOL_REPLICAS
    spec = s.BlazenPeerSpec.model_validate(merged)
    if spec.network_policy.allowed_from:
        router = s.NetworkPeer(pod_selector={"matchLabels": router_selector(f)})
        spec.network_policy.allowed_from = [*spec.network_policy.allowed_from, router]
    return spec


def pool_peer(f: Fleet, pool: fs.FleetPool) -> dict[str, Any]:
    """The pool's BlazenPeer as the fleet applies it: without spec.replicas, which the fleet writes
    separately (replicas_patch) so that scaling the BlazenPeer itself is not undone."""
    spec = pool_spec(f, pool).dump()
    spec.pop("replicas")
    return {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "metadata": metadata(f, pool_peer_name(f, pool.name), pool_labels(f, pool.name)),
        "spec": spec,
    }


def pool_replicas(pool: fs.FleetPool) -> int:
    return pool.replicas if pool.replicas is not None else DEFAULT_POOL_REPLICAS


def replicas_patch(f: Fleet, pool: fs.FleetPool) -> dict[str, Any]:
    """spec.replicas and the annotation recording it, applied under a field manager of their own."""
    n = pool_replicas(pool)
    return {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "metadata": {
            "name": pool_peer_name(f, pool.name),
            "namespace": f.namespace,
            "annotations": {FLEET_REPLICAS_ANNOTATION: str(n)},
        },
        "spec": {"replicas": n},
    }


def replicas_due(f: Fleet, pool: fs.FleetPool, live: dict[str, Any] | None) -> bool:
    """Whether the fleet writes the pool's replicas now: at creation, and when pools[].replicas changed
    since the fleet last wrote it (not when the BlazenPeer was scaled on its own since)."""
    if live is None:
        return True
    applied = ((live.get("metadata") or {}).get("annotations") or {}).get(FLEET_REPLICAS_ANNOTATION)
    return applied != str(pool_replicas(pool))
