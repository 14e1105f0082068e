"""One reconcile pass of one BlazenPeer: plan (builders), execute (apply), observe, status (pure), write.

Ordered steps; the first refused child stops the pass and is reported in the status (KubeRay-style), transient
API errors propagate as :class:`ApiError` with ``transient`` set so the caller retries with backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import metrics
from . import spec as s
from . import status as st
from .apply import FIELD_MANAGER, PRUNABLE, Api, ApiError, path_for, read_peer_infos
from .builders import Child, Peer, desired, workload
from .builders import common as c

log = logging.getLogger(__name__)
STATUS_KEYS = set(s.BlazenPeerStatus.model_json_schema(by_alias=True)["properties"])


@dataclass
class Outcome:
    status: dict[str, Any] | None = None
    error: ApiError | None = None  # transient: retry
    gone: bool = False
    wrote_status: bool = False


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


def shared_manager(peer_name: str) -> str:
    return f"{FIELD_MANAGER}.{peer_name}"[:128]


class Reconciler:
    def __init__(self, api: Api) -> None:
        self.api = api
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> Outcome:
        started = time.monotonic()
        with self._lock((namespace, name)):
            try:
                outcome = self._reconcile(namespace, name, body)
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
    def _reconcile(self, namespace: str, name: str, body: dict[str, Any] | None) -> Outcome:
        api = self.api
        # Always read the object fresh: the status we compare against must be the latest.
        body = api.get(s.API_VERSION, s.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return Outcome(gone=True)
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        previous = body.get("status") or {}

        try:
            peer = Peer.from_body(body)
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

        children = desired(peer)
        apply_error = self._apply_children(peer, children)
        if apply_error is None:
            self._prune(peer, children)

        deployment = api.get("apps/v1", "Deployment", namespace, c.deployment_name(peer))
        certificate = None
        if peer.spec.tls.enabled:
            certificate = api.get("cert-manager.io/v1", "Certificate", namespace, c.server_cert_name(peer))
        pods = self._observe_pods(peer)
        observed = st.Observed(
            generation=generation,
            peer=peer,
            apply_error=apply_error,
            token_missing=token_missing,
            deployment=deployment,
            certificate=certificate,
            pods=pods,
        )
        return self._write_status(body, observed, previous)

    def _apply_children(self, peer: Peer, children: list[Child]) -> str | None:
        for child in children:
            manager = shared_manager(peer.name) if child.shared else FIELD_MANAGER
            try:
                if child.create_only:
                    self.api.create_if_absent(child.manifest)
                    self.api.apply(_meta_only(child.manifest), manager)
                else:
                    self._apply_or_replace(child, manager)
                metrics.APPLIES.labels(kind=child.manifest["kind"]).inc()
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                kind, cname = child.manifest["kind"], child.manifest["metadata"]["name"]
                log.warning("%s/%s: applying %s %s failed: %s", peer.namespace, peer.name, kind, cname, exc)
                return f"{kind} {cname}: {exc.message or exc}"
        return None

    def _apply_or_replace(self, child: Child, manager: str) -> None:
        try:
            self.api.apply(child.manifest, manager)
        except ApiError as exc:
            # A 422 on an object whose content is entirely ours (not the Deployment: its pod template
            # carries user input) means someone else's list items clash with ours: replace the object,
            # then own it again by apply.
            if exc.status != 422 or child.shared or child.manifest["kind"] in ("Deployment",):
                raise
            log.info("apply of %s refused (%s); replacing it", child.key, exc.message)
            if self.api.replace(child.manifest, manager) is None:
                raise
            self.api.apply(child.manifest, manager)

    def _prune(self, peer: Peer, children: list[Child]) -> None:
        wanted = {
            (m.manifest["apiVersion"], m.manifest["kind"], m.manifest["metadata"]["name"]) for m in children
        }
        selector = f"{c.PEER_LABEL}={peer.name}"
        for api_version, kind in PRUNABLE:
            for item in self.api.list(api_version, kind, peer.namespace, selector):
                meta = item["metadata"]
                owned = any(
                    ref.get("uid") == peer.uid and ref.get("controller")
                    for ref in meta.get("ownerReferences") or []
                )
                if owned and (api_version, kind, meta["name"]) not in wanted:
                    log.info("%s/%s: pruning %s %s", peer.namespace, peer.name, kind, meta["name"])
                    self.api.delete(api_version, kind, peer.namespace, meta["name"], uid=meta.get("uid"))

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
            return Outcome(status=new)
        self.api.apply_status(meta["namespace"], meta["name"], new)
        metrics.STATUS_WRITES.inc()
        for event in st.transitions(previous, new):
            self.api.post_event(body, event.type, event.reason, event.message)
        return Outcome(status=new, wrote_status=True)
