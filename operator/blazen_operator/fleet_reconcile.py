"""One reconcile pass of one BlazenFleet: its pools' BlazenPeers and its router's children (builders),
applied with the BlazenPeer reconciler's mechanisms (apply.Api, the ownership rule, create-only stubs), then
the status (fleet_status, pure) and its Events.

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
from . import metrics
from . import spec as s
from .apply import FIELD_MANAGER, Api, ApiError
from .builders import Child, Fleet, router, router_desired
from .builders import fleet as bf
from .builders.common import OperatorIdentity
from .reconcile import CERT_NAME_ANNOTATION, Outcome, _validation_message

log = logging.getLogger(__name__)
REPLICAS_MANAGER = f"{FIELD_MANAGER}-replicas"
FLEET_STATUS_KEYS = set(fs.BlazenFleetStatus.model_json_schema(by_alias=True)["properties"])
# What a fleet can stop wanting, found by its label: a removed pool, a PDB or NetworkPolicy turned off, the
# router certificate with TLS off.
_PRUNABLE = (
    (s.API_VERSION, s.KIND),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("cert-manager.io/v1", "Certificate"),
)


def _controlled_by(uid: str, obj: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def _ours(f: Fleet, child: Child, live: dict[str, Any]) -> bool:
    """As for a BlazenPeer's children: owned by this fleet, or the TLS Secret cert-manager wrote for our
    Certificate of the same name before our stub existed."""
    meta = live["metadata"]
    if any(ref.get("uid") == f.uid for ref in meta.get("ownerReferences") or []):
        return True
    return child.create_only and (meta.get("annotations") or {}).get(CERT_NAME_ANNOTATION) == meta["name"]


class FleetReconciler:
    """Reconciles one BlazenFleet per call; the fleet queue never runs two passes of one fleet at once."""

    def __init__(self, api: Api, operator: OperatorIdentity | None = None) -> None:
        self.api = api
        self.operator = operator

    def reconcile(self, namespace: str, name: str) -> Outcome:
        try:
            outcome = self._reconcile(namespace, name)
        except ApiError as exc:
            if exc.namespace_terminating:
                outcome = Outcome(gone=True)
            elif exc.transient:
                outcome = Outcome(error=exc)
            else:
                raise
        result = "gone" if outcome.gone else ("retry" if outcome.error else "ok")
        metrics.RECONCILES.labels(result=result).inc()
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
            observed = fst.ObservedFleet(generation=generation, fleet=None, invalid=_validation_message(exc))
            return self._write_status(body, observed, previous)

        children = router_desired(fleet)
        live: dict[tuple[str, str, str], dict[str, Any] | None] = {
            c.key: api.get(c.key[0], c.key[1], namespace, c.key[2]) for c in children
        }
        peers = {
            pool.name: api.get(s.API_VERSION, s.KIND, namespace, bf.pool_peer_name(fleet, pool.name))
            for pool in fleet.spec.pools
        }
        conflict = self._foreign(fleet, children, live, peers)
        apply_error = None
        if conflict is None:
            apply_error = self._apply_pools(fleet, peers) or self._apply_children(fleet, children, live)
        if conflict is None and apply_error is None:
            self._prune(fleet, children)

        observed = fst.ObservedFleet(
            generation=generation,
            fleet=fleet,
            apply_error=apply_error,
            conflict=conflict,
            peers=tuple(peers.items()),
            deployment=live.get(("apps/v1", "Deployment", bf.router_name(fleet))),
            certificate=live.get(("cert-manager.io/v1", "Certificate", router.cert_name(fleet))),
        )
        return self._write_status(body, observed, previous)

    def _foreign(
        self,
        f: Fleet,
        children: list[Child],
        live: dict[tuple[str, str, str], dict[str, Any] | None],
        peers: dict[str, dict[str, Any] | None],
    ) -> str | None:
        """The first object with a child's name that this fleet does not own: never adopted, reported."""
        for child in children:
            obj = live.get(child.key)
            if obj is not None and not _ours(f, child, obj):
                return (
                    f"{child.key[1]} {f.namespace}/{child.key[2]} exists and is not owned by this "
                    "BlazenFleet; the operator does not adopt it: delete or rename it"
                )
        for pool, peer in peers.items():
            if peer is not None and not _controlled_by(f.uid, peer):
                return (
                    f"BlazenPeer {f.namespace}/{bf.pool_peer_name(f, pool)} exists and is not owned by this "
                    "BlazenFleet; the operator does not adopt it: delete or rename it"
                )
        return None

    def _apply_pools(self, f: Fleet, peers: dict[str, dict[str, Any] | None]) -> str | None:
        for pool in f.spec.pools:
            live = peers[pool.name]
            manifest = bf.pool_peer(f, pool)
            try:
                if live is None:
                    # Created with its replicas, which the replicas manager then co-owns: the later applies
                    # without spec.replicas leave it to whoever scales the BlazenPeer.
                    manifest["spec"]["replicas"] = bf.pool_replicas(pool)
                    self.api.apply(manifest, FIELD_MANAGER)
                    peers[pool.name] = self.api.apply(bf.replicas_patch(f, pool), REPLICAS_MANAGER)
                    continue
                if bf.replicas_due(f, pool, live):
                    self.api.apply(bf.replicas_patch(f, pool), REPLICAS_MANAGER)
                peers[pool.name] = self.api.apply(manifest, FIELD_MANAGER)
                metrics.APPLIES.labels(kind=s.KIND).inc()
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                log.warning("%s/%s: applying pool %s failed: %s", f.namespace, f.name, pool.name, exc)
                return f"BlazenPeer {manifest['metadata']['name']}: {exc.message or exc}"
        return None

    def _apply_children(
        self, f: Fleet, children: list[Child], live: dict[tuple[str, str, str], dict[str, Any] | None]
    ) -> str | None:
        for child in children:
            try:
                if child.create_only:
                    if live.get(child.key) is None:
                        self.api.create_if_absent(child.manifest)
                    meta = child.manifest["metadata"]
                    self.api.apply(
                        {
                            "apiVersion": child.manifest["apiVersion"],
                            "kind": child.manifest["kind"],
                            "metadata": {
                                k: meta[k] for k in ("name", "namespace", "labels", "ownerReferences")
                            },
                        },
                        FIELD_MANAGER,
                    )
                else:
                    live[child.key] = self.api.apply(child.manifest, FIELD_MANAGER)
                metrics.APPLIES.labels(kind=child.manifest["kind"]).inc()
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                kind, cname = child.manifest["kind"], child.manifest["metadata"]["name"]
                log.warning("%s/%s: applying %s %s failed: %s", f.namespace, f.name, kind, cname, exc)
                return f"{kind} {cname}: {exc.message or exc}"
        return None

    def _prune(self, f: Fleet, children: list[Child]) -> None:
        wanted = {c.key for c in children}
        wanted |= {(s.API_VERSION, s.KIND, bf.pool_peer_name(f, p.name)) for p in f.spec.pools}
        selector = f"{fs.FLEET_LABEL}={f.name}"
        for api_version, kind in _PRUNABLE:
            for item in self.api.list(api_version, kind, f.namespace, selector):
                meta = item["metadata"]
                if _controlled_by(f.uid, item) and (api_version, kind, meta["name"]) not in wanted:
                    log.info("%s/%s: pruning %s %s", f.namespace, f.name, kind, meta["name"])
                    self.api.delete(api_version, kind, f.namespace, meta["name"], uid=meta.get("uid"))
        # Secrets are never listed: the router certificate's stub goes by name.
        name = router.cert_name(f)
        if ("v1", "Secret", name) not in wanted:
            secret = self.api.get("v1", "Secret", f.namespace, name)
            if secret is not None and _controlled_by(f.uid, secret):
                self.api.delete("v1", "Secret", f.namespace, name, uid=secret["metadata"].get("uid"))

    def _write_status(
        self, body: dict[str, Any], observed: fst.ObservedFleet, previous: dict[str, Any]
    ) -> Outcome:
        meta = body["metadata"]
        new = fst.compute(observed, previous)
        current = {k: v for k, v in previous.items() if k in FLEET_STATUS_KEYS}
        if new == current:
            return Outcome()
        status_body = {
            "apiVersion": s.API_VERSION,
            "kind": fs.KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "status": new,
        }
        try:
            self.api.apply(status_body, FIELD_MANAGER, sub="status")
        except ApiError as exc:
            if exc.not_found:
                return Outcome(gone=True)
            raise
        metrics.STATUS_WRITES.inc()
        for event in fst.transitions(previous, new):
            self.api.post_event(body, event.type, event.reason, event.message)
        return Outcome()
