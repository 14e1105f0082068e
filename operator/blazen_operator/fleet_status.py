"""A BlazenFleet's status as a pure function of what was observed: its pools' BlazenPeers (their own status:
replicas, Ready, servedSteps), the router's Deployment and Certificate. Nothing here talks to the API."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from . import fleet_spec as fs
from . import status as st
from .builders import Fleet, router
from .builders import fleet as bf

CONDITION_TYPES = ("Ready", "Routable", "Degraded")


@dataclass(frozen=True)
class ObservedFleet:
    generation: int
    fleet: Fleet | None  # None when the spec is invalid
    invalid: str | None = None
    apply_error: str | None = None
    conflict: str | None = None
    peers: tuple[tuple[str, dict[str, Any] | None], ...] = ()  # (pool name, its BlazenPeer as read)
    deployment: dict[str, Any] | None = None  # the router's
    certificate: dict[str, Any] | None = None  # the router's
    router_pods: tuple[st.PodReport, ...] = ()  # the router's pods and their /v1/info


def _ready(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    return st._cond(obj, "Ready")


def pool_status(f: Fleet, pool: fs.FleetPool, peer: dict[str, Any] | None) -> fs.PoolStatus:
    """A pool as its BlazenPeer reports it; unserved steps only when the ready pods answered (known)."""
    pstat = (peer or {}).get("status") or {}
    served = pstat.get("servedSteps")
    steps = bf.pool_spec(f, pool).steps
    unserved = sorted(set(steps) - set(served)) if steps is not None and served is not None else None
    ready = _ready(peer)
    return fs.PoolStatus(
        name=pool.name,
        peer=bf.pool_peer_name(f, pool.name),
        replicas=((peer or {}).get("spec") or {}).get("replicas"),
        ready_replicas=int(pstat.get("readyReplicas") or 0) if peer is not None else None,
        ready=None if ready is None else ready.get("status") == "True",
        served_steps=served,
        unserved_steps=unserved or None,
    )


def routes(pools: list[fs.PoolStatus]) -> dict[str, list[str]]:
    """step id -> the pools whose ready pods serve it (what the router will find when it asks them)."""
    out: dict[str, list[str]] = {}
    for p in pools:
        if p.ready_replicas:
            for step in p.served_steps or []:
                out.setdefault(step, []).append(p.name)
    return {step: sorted(names) for step, names in sorted(out.items())}


def split_counts(pods: tuple[st.PodReport, ...], key: str) -> dict[str, int] | None:
    """``router.split.<key>`` (runs by outcome, steps by pool) of the ready router pods' /v1/info, summed;
    None when none reported it. Each pod counts since it started, as its /metrics."""
    out: dict[str, int] = {}
    reported = False
    for pod in pods:
        split = ((pod.info or {}).get("router") or {}).get("split") if pod.ready else None
        counts = split.get(key) if isinstance(split, dict) else None
        if not isinstance(counts, dict):
            continue
        reported = True
        for name, n in counts.items():
            if isinstance(name, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                out[name] = out.get(name, 0) + n
    return dict(sorted(out.items())) if reported else None


def routable(r: st.Rollout, pools: list[fs.PoolStatus]) -> st.Cond:
    """Can a call to the fleet endpoint reach a pool? A ready router, and a ready pod in every pool."""
    if not r.exists:
        return "False", "RouterMissing", "the router Deployment does not exist yet"
    if r.ready == 0:
        return "False", "RouterNotReady", f"0/{r.desired} router pods ready"
    empty = [p.name for p in pools if not p.ready_replicas]
    if empty:
        return "False", "PoolsNotReady", f"pools without a ready pod: {', '.join(empty)}"
    return "True", "Routable", f"{r.ready} router pods; every pool has a ready pod"


def degraded_reasons(
    o: ObservedFleet, pools: list[fs.PoolStatus], r: st.Rollout, cert: st.Cond
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if o.conflict:
        out.append(("ChildNotOwned", o.conflict))
    if o.apply_error:
        out.append(("ApplyFailed", o.apply_error))
    unserved = [f"{p.name}: {', '.join(p.unserved_steps)}" for p in pools if p.unserved_steps]
    if unserved:
        out.append(("StepsNotServed", f"steps no ready pod serves: {'; '.join(unserved)}"))
    for name, peer in o.peers:
        cond = st._cond(peer, "Degraded")
        # a pool's own StepsNotServed is the fleet's, said above with the steps
        if cond is not None and cond.get("status") == "True" and cond.get("reason") != "StepsNotServed":
            out.append(("PoolDegraded", f"pool {name}: {cond.get('reason')}: {cond.get('message') or ''}"))
    if (deadline := r.deadline_exceeded) is not None:
        out.append(("RouterProgressDeadlineExceeded", deadline.get("message") or ""))
    if cert[0] == "False" and cert[1] in st.CERT_FAILURES:
        out.append((cert[1], cert[2]))
    return out


def ready(deg: st.Cond, route: st.Cond, r: st.Rollout, cert: st.Cond, pools: list[fs.PoolStatus]) -> st.Cond:
    if deg[0] == "True":
        return "False", deg[1], deg[2]
    not_ready = [p.name for p in pools if not p.ready]
    if not_ready:
        return "False", "PoolsNotReady", f"pools not Ready: {', '.join(not_ready)}"
    if cert[0] != "True":
        return "False", "CertificateNotReady", cert[2]
    if not r.rolled_out:
        return "False", "RouterNotReady", f"{r.ready}/{r.desired} router pods ready on the current template"
    if route[0] != "True" and r.desired > 0:
        return "False", route[1], route[2]
    return "True", "AllReady", f"{len(pools)} pools and {r.ready} router pods ready"


def compute(
    o: ObservedFleet, previous: dict[str, Any] | None = None, now: dt.datetime | None = None
) -> dict[str, Any]:
    previous = previous or {}
    stamp = st._now(now)
    f = o.fleet
    if f is None:
        msg = o.invalid or "invalid spec"
        kept = {
            k: previous[k] for k in ("pools", "routes", "router", "endpoints", "readyPools") if k in previous
        }
        out = fs.BlazenFleetStatus.model_validate(
            {**kept, "observedGeneration": o.generation, "phase": "Invalid"}
        )
        conds: dict[str, st.Cond] = {
            "Ready": ("False", "InvalidSpec", msg),
            "Degraded": ("True", "InvalidSpec", msg),
        }
        return _finish(out, conds, previous, stamp, o.generation)

    live = dict(o.peers)
    pools = [pool_status(f, pool, live.get(pool.name)) for pool in f.spec.pools]
    rp = router.router_peer(f)
    r = st.Rollout.of(o.deployment, f.spec.router.replicas, router.config_hash(f))
    cert = st.certificate_state(rp, o.certificate)
    route = routable(r, pools)
    deg = st.degraded(degraded_reasons(o, pools, r, cert))
    rdy = ready(deg, route, r, cert, pools)
    phase = "Degraded" if deg[0] == "True" else "Ready" if rdy[0] == "True" else "Progressing"
    out = fs.BlazenFleetStatus(
        observed_generation=o.generation,
        phase=phase if o.deployment is not None or phase != "Progressing" else "Pending",
        pools=pools,
        ready_pools=f"{sum(1 for p in pools if p.ready_replicas)}/{len(pools)}",
        # absent, never {}: a server-side apply that empties a map it owned leaves it null, which the schema
        # refuses
        routes=routes(pools) or None,
        router=fs.RouterStatus(
            replicas=f.spec.router.replicas,
            ready_replicas=r.ready,
            split_runs=split_counts(o.router_pods, "runs"),
            split_steps=split_counts(o.router_pods, "steps"),
        ),
        endpoints=router.endpoints(f),
        certificate=_certificate(f, o.certificate, cert[0] == "True"),
    )
    return _finish(out, {"Ready": rdy, "Routable": route, "Degraded": deg}, previous, stamp, o.generation)


def _certificate(f: Fleet, cert: dict[str, Any] | None, ok: bool) -> Any:
    if not f.spec.tls.enabled:
        return None
    cstat = (cert or {}).get("status") or {}
    return {
        "name": router.cert_name(f),
        "secretName": router.cert_name(f),
        # the fleet's callers' certificate, when the router asks for one
        "clientSecretName": router.client_cert_name(f) if router.verifies_client_certificates(f) else None,
        "ready": ok,
        "notAfter": cstat.get("notAfter") or None,
        "renewalTime": cstat.get("renewalTime") or None,
    }


def _finish(
    out: fs.BlazenFleetStatus,
    conds: dict[str, st.Cond],
    previous: dict[str, Any],
    stamp: str,
    generation: int,
) -> dict[str, Any]:
    out.conditions = st.conditions(CONDITION_TYPES, conds, previous, stamp, generation)
    return out.dump()


def transitions(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[st.Transition]:
    """The BlazenPeer's events (Degraded, Ready), plus Routable's moves."""
    events = st.transitions(previous, current)
    before = {x["type"]: x for x in (previous or {}).get("conditions") or []}
    after = {x["type"]: x for x in current.get("conditions") or []}
    new, old = after.get("Routable"), before.get("Routable")
    if new is not None and (old is None or old["status"] != new["status"]):
        if new["status"] == "True":
            events.append(st.Transition("Normal", "Routable", new["message"]))
        elif old is not None:
            events.append(st.Transition("Warning", new["reason"], new["message"]))
    old_routes, new_routes = (previous or {}).get("routes"), current.get("routes")
    if old_routes is not None and new_routes != old_routes:
        events.append(st.Transition("Normal", "RoutesChanged", _routes_line(new_routes or {})))
    return events


def _routes_line(table: dict[str, list[str]]) -> str:
    return "; ".join(f"{step} -> {', '.join(pools)}" for step, pools in table.items()) or "no routes"
