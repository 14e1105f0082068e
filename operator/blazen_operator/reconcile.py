"""One reconcile pass of one BlazenPeer: plan (builders), execute (apply), observe, status (pure), write.

Ordered steps; the first refused child stops the pass and is reported in the status (KubeRay-style), transient
API errors propagate as :class:`ApiError` with ``transient`` set so the caller retries with backoff.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import metrics
from . import spec as s
from . import status as st
from .apply import FIELD_MANAGER, Api, ApiError, path_for, read_peer_infos
from .builders import Child, Peer, certs, desired, workload
from .builders import common as c
from .kinds import PRUNABLE
from .trust import Trust

log = logging.getLogger(__name__)
CERT_NAME_ANNOTATION = "cert-manager.io/certificate-name"
STATUS_KEYS = set(s.BlazenPeerStatus.model_json_schema(by_alias=True)["properties"])


@dataclass
class Outcome:
    error: ApiError | None = None  # transient: retry
    gone: bool = False


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"spec.{loc}: {err['msg']}")
    return "; ".join(parts)


def _meta_only(manifest: dict[str, Any]) -> dict[str, Any]:
    meta = manifest["metadata"]
    return {
        "apiVersion": manifest["apiVersion"],
        "kind": manifest["kind"],
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "ownerReferences") if k in meta},
    }


def _foreign_child(
    peer: Peer, children: list[Child], live: dict[tuple[str, str, str], dict[str, Any] | None]
) -> str | None:
    """The first desired child that exists but is not this BlazenPeer's: the operator never adopts (and so
    never overwrites) an object it did not create; the status names it instead."""
    for child in children:
        obj = live.get(child.key)
        if obj is not None and not _ours(peer, child, obj):
            _, kind, name = child.key
            return (
                f"{kind} {peer.namespace}/{name} exists and is not owned by this BlazenPeer; "
                "the operator does not adopt it: delete or rename it"
            )
    return None


def _controlled_by(peer: Peer, obj: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("uid") == peer.uid and ref.get("controller") for ref in refs)


def _ours(peer: Peer, child: Child, live: dict[str, Any]) -> bool:
    meta = live["metadata"]
    refs = meta.get("ownerReferences") or []
    if any(ref.get("uid") == peer.uid for ref in refs):
        return True
    # A TLS Secret that cert-manager (re)wrote for our Certificate of the same name before our stub existed.
    return child.create_only and (meta.get("annotations") or {}).get(CERT_NAME_ANNOTATION) == meta["name"]


class Reconciler:
    """Reconciles one BlazenPeer per call. Not reentrant for one object: the work queue never runs two passes
    of the same BlazenPeer at once."""

    def __init__(
        self, api: Api, operator: c.OperatorIdentity | None = None, trust: Trust | None = None
    ) -> None:
        self.api = api
        self.operator = operator
        self.trust = trust or Trust(api)

    def reconcile(self, namespace: str, name: str) -> Outcome:
        started = time.monotonic()
        try:
            outcome = self._reconcile(namespace, name)
        except ApiError as exc:
            if exc.namespace_terminating:  # the namespace (and the BlazenPeer with it) is going away
                outcome = Outcome(gone=True)
            elif exc.transient:
                outcome = Outcome(error=exc)
            else:
                raise
        result = "gone" if outcome.gone else ("retry" if outcome.error else "ok")
        metrics.RECONCILES.labels(result=result).inc()
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        return outcome

    # ------------------------------------------------------------------------------------------------
    def _reconcile(self, namespace: str, name: str) -> Outcome:
        api = self.api
        # Always read the object fresh: the status we compare against must be the latest.
        body = api.get(s.API_VERSION, s.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.trust.sync(namespace)  # the last BlazenPeer on the namespace CA takes it along
            return Outcome(gone=True)
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        previous = body.get("status") or {}

        try:
            peer = Peer.from_body(body, operator=self.operator)
        except ValidationError as exc:
            observed = st.Observed(generation=generation, peer=None, invalid=_validation_message(exc))
            return self._write_status(body, observed, previous)

        token_missing = None
        ref = peer.spec.auth.token_secret_ref
        if ref is not None:
            secret = api.get("v1", "Secret", namespace, ref.name)
            if secret is None:
                token_missing = f"token Secret {ref.name} does not exist"
            elif ref.key not in (secret.get("data") or {}):
                token_missing = f"token Secret {ref.name} has no key {ref.key!r}"

        rotation = self.trust.sync_if_due(namespace) if c.uses_namespace_ca(peer) else None
        children = desired(peer)
        live = {child.key: api.get(child.key[0], child.key[1], namespace, child.key[2]) for child in children}
        conflict = _foreign_child(peer, children, live)
        apply_error = None if conflict else self._apply_children(peer, children, live)
        if conflict is None and apply_error is None:
            self._prune(peer, children)

        # As read before the pass, or as the apply returned them: status included, no second read.
        deployment = live.get(("apps/v1", "Deployment", c.deployment_name(peer)))
        certificate = live.get(("cert-manager.io/v1", "Certificate", c.server_cert_name(peer)))
        pods = self._observe_pods(peer)
        observed = st.Observed(
            generation=generation,
            peer=peer,
            apply_error=apply_error,
            conflict=conflict,
            token_missing=token_missing,
            deployment=deployment,
            certificate=certificate,
            pods=pods,
            ca_rotation=rotation.condition(peer.name) if rotation is not None else None,
        )
        return self._write_status(body, observed, previous)

    def _apply_children(
        self, peer: Peer, children: list[Child], live: dict[tuple[str, str, str], dict[str, Any] | None]
    ) -> str | None:
        for child in children:
            manager = FIELD_MANAGER
            try:
                if child.create_only:
                    if live.get(child.key) is None:
                        self.api.create_if_absent(child.manifest)
                    self.api.apply(_meta_only(child.manifest), manager)
                else:
                    live[child.key] = self._apply_or_replace(child, manager)
                metrics.APPLIES.labels(kind=child.manifest["kind"]).inc()
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                kind, cname = child.manifest["kind"], child.manifest["metadata"]["name"]
                log.warning("%s/%s: applying %s %s failed: %s", peer.namespace, peer.name, kind, cname, exc)
                return f"{kind} {cname}: {exc.message or exc}"
        return None

    def _apply_or_replace(self, child: Child, manager: str) -> dict[str, Any]:
        """The object as the API server stored it."""
        try:
            return self.api.apply(child.manifest, manager)
        except ApiError as exc:
            # A 422 on an object whose content is entirely ours (not the Deployment: its pod template
            # carries user input) means someone else's list items clash with ours: overwrite them, then own
            # the fields again by apply.
            if exc.status != 422 or child.manifest["kind"] == "Deployment":
                raise
            log.info("apply of %s refused (%s); overwriting it", child.key, exc.message)
            if self.api.merge_replace(child.manifest) is None:
                raise
            return self.api.apply(child.manifest, manager)

    def _prune(self, peer: Peer, children: list[Child]) -> None:
        wanted = {child.key for child in children}
        selector = f"{c.PEER_LABEL}={peer.name}"
        for api_version, kind in PRUNABLE:
            for item in self.api.list(api_version, kind, peer.namespace, selector):
                meta = item["metadata"]
                if _controlled_by(peer, item) and (api_version, kind, meta["name"]) not in wanted:
                    log.info("%s/%s: pruning %s %s", peer.namespace, peer.name, kind, meta["name"])
                    self.api.delete(api_version, kind, peer.namespace, meta["name"], uid=meta.get("uid"))
        # Secrets are never listed (the operator may not enumerate them): the stubs go by name.
        for name in certs.stub_names(peer):
            if ("v1", "Secret", name) in wanted:
                continue
            secret = self.api.get("v1", "Secret", peer.namespace, name)
            if secret is not None and _controlled_by(peer, secret):
                log.info("%s/%s: pruning Secret %s", peer.namespace, peer.name, name)
                self.api.delete("v1", "Secret", peer.namespace, name, uid=secret["metadata"].get("uid"))

    def _observe_pods(self, peer: Peer) -> tuple[st.PodReport, ...]:
        pods = self.api.list("v1", "Pod", peer.namespace, c.selector_string(peer))
        reports: list[tuple[dict[str, Any], bool, str | None]] = []
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                continue
            conds = (pod.get("status") or {}).get("conditions") or []
            ready = any(x.get("type") == "Ready" and x.get("status") == "True" for x in conds)
            ip = (pod.get("status") or {}).get("podIP")
            url = f"http://{ip}:{peer.spec.ports.admin}/v1/info" if ready and ip else None
            reports.append((pod, ready, url))
        urls = [u for _, _, u in reports if u]
        infos = dict(zip(urls, read_peer_infos(urls), strict=True))
        out = []
        for pod, ready, url in reports:
            info = infos.get(url) if url else None
            self._keep_deletion_cost(pod, st.session_refs(info))
            out.append(st.PodReport(pod["metadata"]["name"], ready, info))
        return tuple(out)

    def _keep_deletion_cost(self, pod: dict[str, Any], refs: int | None) -> None:
        """Keep the pod's deletion cost at what it reported: a scale-down then removes pods without session
        refs first. Best effort: a failed patch only means the controller picks by its own rules."""
        if refs is None:
            return
        meta = pod["metadata"]
        cost = workload.pod_deletion_cost(refs)
        if (meta.get("annotations") or {}).get(workload.DELETION_COST_ANNOTATION) == cost:
            return
        try:
            self.api.request(
                "PATCH",
                path_for("v1", "Pod", meta["namespace"], meta["name"]),
                body={"metadata": {"annotations": {workload.DELETION_COST_ANNOTATION: cost}}},
                content_type="application/merge-patch+json",
                what="pod deletion cost",
            )
        except ApiError as exc:
            if exc.transient:
                raise
            log.info("pod %s/%s: deletion cost not updated: %s", meta["namespace"], meta["name"], exc)

    def _write_status(self, body: dict[str, Any], observed: st.Observed, previous: dict[str, Any]) -> Outcome:
        meta = body["metadata"]
        new = st.compute(observed, previous)
        current = {k: v for k, v in previous.items() if k in STATUS_KEYS}
        if new == current:
            return Outcome()
        self.api.apply_status(meta["namespace"], meta["name"], new)
        metrics.STATUS_WRITES.inc()
        for event in st.transitions(previous, new):
            self.api.post_event(body, event.type, event.reason, event.message)
        return Outcome()
