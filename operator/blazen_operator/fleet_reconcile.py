"""One reconcile pass of one BlazenFleet: its pools' BlazenPeers and its router's children (builders),
applied by the BlazenPeer reconciler's :class:`~.reconcile.ChildApplier` (the ownership rule, create-only
stubs, the child cache, its memory of what it applied, and its pruning: a pass over an unchanged fleet
writes nothing and lists nothing but its router pods when their rollout moved, a child or pool someone edited
is applied again), then the status (fleet_status, pure), written only when it changed, and its Events.

Pool replicas: the fleet applies each pool's BlazenPeer without spec.replicas (field manager
``blazen-operator``) and writes spec.replicas under a manager of its own (``blazen-operator-replicas``) only
when the BlazenPeer is created or pools[].replicas changed since it last wrote it (recorded in an annotation).
`kubectl scale bp/<fleet>-<pool>` and an HPA thus own the replicas in between, and are never reverted.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from . import fleet_spec as fs
from . import fleet_status as fst
from . import spec as s
from .apply import FIELD_MANAGER, Api, ApiError
from .builders import Child, Fleet, router, router_desired
from .builders import fleet as bf
from .builders.common import OperatorIdentity
from .cache import ChildCache, Live, compact
from .reconcile import (
    ChildApplier,
    ChildId,
    ChildMemory,
    Outcome,
    PodsSeen,
    controlled_by,
    foreign_child,
    observe_pods,
    run_pass,
    validation_message,
    write_status,
)

log = logging.getLogger(__name__)
REPLICAS_MANAGER = f"{FIELD_MANAGER}-replicas"
FLEET_STATUS_KEYS = set(fs.BlazenFleetStatus.model_json_schema(by_alias=True)["properties"])
# What a fleet can stop wanting: a removed pool, a PDB or NetworkPolicy turned off, the router certificate
# with TLS off, the callers' certificate with client certificates off. Found in the child cache, which the
# watches feed with these kinds (handlers.pool_event: the pools), else listed by the fleet label.
PRUNABLE = (
    (s.API_VERSION, s.KIND),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("cert-manager.io/v1", "Certificate"),
)


class FleetReconciler:
    """Reconciles one BlazenFleet per call; the fleet queue never runs two passes of one fleet at once."""

    def __init__(
        self,
        api: Api,
        operator: OperatorIdentity | None = None,
        cache: ChildCache | None = None,
        recheck_seconds: float = 60.0,
    ) -> None:
        self.api = api
        self.operator = operator
        # the BlazenPeer reconciler's, fed by the same watches (the router's children carry our label)
        self.children = ChildApplier(api, cache if cache is not None else ChildCache(), recheck_seconds)
        self.recheck_seconds = recheck_seconds
        self._memory: dict[tuple[str, str], ChildMemory] = {}
        self._router_pods: dict[tuple[str, str], PodsSeen] = {}  # per fleet: its router pods as last read

    def reconcile(self, namespace: str, name: str) -> Outcome:
        outcome = run_pass(self._reconcile, namespace, name)
        if outcome.gone:
            self._memory.pop((namespace, name), None)
            self._router_pods.pop((namespace, name), None)
        return outcome

    def _reconcile(self, namespace: str, name: str) -> Outcome:
        api = self.api
        body = api.get(s.API_VERSION, fs.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return Outcome(gone=True)
        generation = int(body["metadata"].get("generation") or 0)
        previous = body.get("status") or {}
        try:
            fleet = Fleet.from_body(body, operator=self.operator)
            for pool in fleet.spec.pools:  # every pool's merged spec must be a valid BlazenPeer spec
                bf.pool_spec(fleet, pool)
        except ValidationError as exc:
            observed = fst.ObservedFleet(generation=generation, fleet=None, invalid=validation_message(exc))
            return self._write_status(body, observed, previous)

        memory = self._memory.get((namespace, name))
        if memory is None or memory.uid != fleet.uid:
            memory = self._memory[(namespace, name)] = ChildMemory(fleet.uid)
        children = router_desired(fleet)
        live = {child.key: self.children.live(fleet, child, children, memory) for child in children}
        # Read fresh each pass (their watch wakes the fleet, but only their status matters to it there).
        peers = {
            pool.name: api.get(s.API_VERSION, s.KIND, namespace, bf.pool_peer_name(fleet, pool.name))
            for pool in fleet.spec.pools
        }
        conflict = foreign_child(fleet, children, live, fs.KIND) or self._foreign_pool(fleet, peers)
        apply_error = None
        if conflict is None:
            apply_error = self._apply_pools(fleet, peers, memory) or self.children.apply_all(
                fleet, children, live, memory
            )
        if conflict is None and apply_error is None:
            self._prune(fleet, children, memory)

        deployment = live.get(("apps/v1", "Deployment", bf.router_name(fleet)))
        certificate = live.get(("cert-manager.io/v1", "Certificate", router.cert_name(fleet)))
        # the router's /v1/info (split runs) as a BlazenPeer's pods are read: bounded per Deployment
        router_pods = self._router_pods[(namespace, name)] = observe_pods(
            api,
            self._router_pods.get((namespace, name)),
            deployment.obj if deployment else None,
            namespace,
            router.selector_string(fleet),
            fleet.spec.router.ports.admin,
            self.recheck_seconds,
        )
        observed = fst.ObservedFleet(
            generation=generation,
            fleet=fleet,
            apply_error=apply_error,
            conflict=conflict,
            peers=tuple(peers.items()),
            deployment=deployment.obj if deployment else None,
            certificate=certificate.obj if certificate else None,
            router_pods=router_pods.reports,
        )
        return self._write_status(body, observed, previous)

    @staticmethod
    def _foreign_pool(f: Fleet, peers: dict[str, dict[str, Any] | None]) -> str | None:
        for pool, peer in peers.items():
            if peer is not None and not controlled_by(f, peer):
                return (
                    f"BlazenPeer {f.namespace}/{bf.pool_peer_name(f, pool)} exists and is not owned by this "
                    "BlazenFleet; the operator does not adopt it: delete or rename it"
                )
        return None

    def _apply_pools(
        self, f: Fleet, peers: dict[str, dict[str, Any] | None], memory: ChildMemory
    ) -> str | None:
        for pool in f.spec.pools:
            body = peers[pool.name]
            manifest = bf.pool_peer(f, pool)
            if body is None:
                # Created with its replicas, which the replicas manager then co-owns: the later applies
                # without spec.replicas leave it to whoever scales the BlazenPeer.
                manifest["spec"]["replicas"] = bf.pool_replicas(pool)
            child = Child(manifest)
            live: dict[ChildId, Live | None] = {child.key: None if body is None else compact(body)}
            try:
                written = self.children.apply(f, child, [child], live, memory)
                if bf.replicas_due(f, pool, body):
                    written = self.api.apply(bf.replicas_patch(f, pool), REPLICAS_MANAGER)
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                log.warning("%s/%s: applying pool %s failed: %s", f.namespace, f.name, pool.name, exc)
                return f"BlazenPeer {manifest['metadata']['name']}: {exc.message or exc}"
            if written is not None:
                peers[pool.name] = written
        return None

    def _prune(self, f: Fleet, children: list[Child], memory: ChildMemory) -> None:
        wanted = {c.key for c in children}
        wanted |= {(s.API_VERSION, s.KIND, bf.pool_peer_name(f, p.name)) for p in f.spec.pools}
        # the certificate stubs and the router token go by name, as a BlazenPeer's stubs
        self.children.prune(f, wanted, PRUNABLE, f"{fs.FLEET_LABEL}={f.name}", router.secret_names(f), memory)

    def _write_status(
        self, body: dict[str, Any], observed: fst.ObservedFleet, previous: dict[str, Any]
    ) -> Outcome:
        new = fst.compute(observed, previous)
        return write_status(self.api, body, new, previous, FLEET_STATUS_KEYS, fst.transitions)
