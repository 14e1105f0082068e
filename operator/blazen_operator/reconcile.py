"""One reconcile pass of one BlazenPeer: plan (builders), execute (apply), observe, status (pure), write.

Ordered steps; the first refused child stops the pass and is reported in the status (KubeRay-style), transient
API errors propagate as :class:`ApiError` with ``transient`` set so the caller retries with backoff.

A pass over an unchanged BlazenPeer writes nothing. The children are read from the watch cache (cache.py;
once a kind's watch has listed everything, a child it does not know is created without a read first); a
child is applied only when it is missing, when what the builders want differs from what this process last
applied to it, or when the fields our apply owns changed since (someone edited or removed one: drift). The
first pass after the operator starts has no such memory and applies each child once (no-op applies when
nothing changed). What no watch reports is re-read when something says it changed, else at most once per
``recheck_seconds``: the Secret stubs (by name; never watched) when the Certificate filling them was
issued, the pods and their ``/v1/info`` when the Deployment's rollout moved. The status is written only
when it changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from . import metrics
from . import spec as s
from . import status as st
from .apply import FIELD_MANAGER, Api, ApiError, path_for, read_peer_infos
from .builders import Child, Peer, certs, desired, workload
from .builders import common as c
from .cache import (
    CERT_NAME_ANNOTATION,
    Applied,
    ChildCache,
    Live,
    applied,
    compact,
    meta_current,
    meta_only,
    unchanged,
)
from .kinds import PRUNABLE
from .trust import Trust

log = logging.getLogger(__name__)
ABSENT = "1"  # the resourceVersion precondition of a create by apply (ChildApplier._create)
STATUS_KEYS = set(s.BlazenPeerStatus.model_json_schema(by_alias=True)["properties"])


@dataclass
class Outcome:
    error: ApiError | None = None  # transient: retry
    gone: bool = False


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"spec.{loc}: {err['msg']}")
    return "; ".join(parts)


ChildId = tuple[str, str, str]  # (apiVersion, kind, name) in the owner's namespace


class Owner(Protocol):
    """What owns children: a BlazenPeer (builders.Peer) or a BlazenFleet (builders.Fleet)."""

    @property
    def name(self) -> str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def uid(self) -> str: ...


def foreign_child(
    owner: Owner, children: list[Child], live: dict[ChildId, Live | None], kind: str = s.KIND
) -> str | None:
    """The first desired child that exists but is not the owner's: the operator never adopts (and so never
    overwrites) an object it did not create; the status names it instead."""
    for child in children:
        rec = live.get(child.key)
        if rec is not None and not _ours(owner, child, rec.obj):
            _, child_kind, name = child.key
            return (
                f"{child_kind} {owner.namespace}/{name} exists and is not owned by this {kind}; "
                "the operator does not adopt it: delete or rename it"
            )
    return None


def controlled_by(owner: Owner, obj: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid and ref.get("controller") for ref in refs)


def _ours(owner: Owner, child: Child, live: dict[str, Any]) -> bool:
    meta = live["metadata"]
    refs = meta.get("ownerReferences") or []
    if any(ref.get("uid") == owner.uid for ref in refs):
        return True
    # A TLS Secret that cert-manager (re)wrote for our Certificate of the same name before our stub existed.
    return child.create_only and (meta.get("annotations") or {}).get(CERT_NAME_ANNOTATION) == meta["name"]


def _rollout_signature(deployment: dict[str, Any] | None) -> tuple[Any, ...]:
    """What of the Deployment says its pods changed (created, ready, replaced)."""
    if deployment is None:
        return ()
    st_ = deployment.get("status") or {}
    keys = ("observedGeneration", "replicas", "readyReplicas", "updatedReplicas", "availableReplicas")
    return (str(deployment["metadata"].get("uid") or ""), *(st_.get(k) for k in keys))


@dataclass(frozen=True)
class PodsSeen:
    """A Deployment's pods and what their ``/v1/info`` said, as last read: when, and the rollout then."""

    signature: tuple[Any, ...]
    at: float  # monotonic
    # (the pod as listed, reduced to what the deletion-cost patch reads: _pod_ref; its report). Kept per
    # BlazenPeer for the recheck period: whole pods (managedFields, spec, status) were ~40 MB at 1,000.
    pods: tuple[tuple[dict[str, Any], st.PodReport], ...]

    @property
    def reports(self) -> tuple[st.PodReport, ...]:
        return tuple(report for _, report in self.pods)


def observe_pods(
    api: Api,
    seen: PodsSeen | None,
    deployment: dict[str, Any] | None,
    namespace: str,
    selector: str,
    admin_port: int,
    recheck_seconds: float,
) -> PodsSeen:
    """The pods of ``deployment`` (``selector`` in ``namespace``) and the ``/v1/info`` of the ready ones,
    read again only when its rollout moved or the last read is ``recheck_seconds`` old: the reads per
    Deployment are bounded whatever the number of passes. A BlazenPeer's pods and a fleet's router pods."""
    signature, now = _rollout_signature(deployment), time.monotonic()
    if seen is not None and seen.signature == signature and now - seen.at < recheck_seconds:
        return seen
    listed: list[tuple[dict[str, Any], bool, str | None]] = []
    for pod in api.each("v1", "Pod", namespace, selector, restarted=listed.clear):
        if pod["metadata"].get("deletionTimestamp"):
            continue
        conds = (pod.get("status") or {}).get("conditions") or []
        ready = any(x.get("type") == "Ready" and x.get("status") == "True" for x in conds)
        ip = (pod.get("status") or {}).get("podIP")
        url = f"http://{ip}:{admin_port}/v1/info" if ready and ip else None
        listed.append((_pod_ref(pod), ready, url))
    urls = [u for _, _, u in listed if u]
    infos = dict(zip(urls, read_peer_infos(urls), strict=True))
    reports = tuple(
        (pod, st.PodReport(pod["metadata"]["name"], ready, infos.get(url) if url else None))
        for pod, ready, url in listed
    )
    return PodsSeen(signature, now, reports)


def _pod_ref(pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    cost = (meta.get("annotations") or {}).get(workload.DELETION_COST_ANNOTATION)
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "annotations": {} if cost is None else {workload.DELETION_COST_ANNOTATION: cost},
        }
    }


@dataclass
class ChildMemory:
    """What this process knows of one owner's children between its passes (never shared between two passes
    at once: a work queue runs one pass per object)."""

    uid: str
    applied: dict[tuple[ChildId, str], Applied] = field(default_factory=dict)
    # stub -> (what it was checked against: its metadata digest and its Certificate's issuance, uid/revision;
    # when; the stub as read or written then)
    stubs: dict[ChildId, tuple[tuple[str, str], float, Live]] = field(default_factory=dict)
    stubs_gone: set[ChildId] = field(default_factory=set)  # pruned stubs, known absent
    # children that exist without the cache knowing them (someone else's object without our label, found by
    # a create that failed): read by name each pass until they go
    unwatched: set[ChildId] = field(default_factory=set)


@dataclass
class PeerMemory(ChildMemory):
    pods: PodsSeen | None = None


class ChildApplier:
    """Reads and applies one owner's children: a BlazenPeer's, and a BlazenFleet's router children and pools
    (fleet_reconcile), by the one rule of this module's docstring: a child is written only when missing,
    when what the builders want differs from what this process last applied, or when a field of ours
    drifted; a Secret stub only when missing or when its labels or owner references are not current."""

    def __init__(self, api: Api, cache: ChildCache, recheck_seconds: float) -> None:
        self.api = api
        self.cache = cache
        self.recheck_seconds = recheck_seconds

    def read(self, namespace: str, child_id: ChildId) -> Live | None:
        obj = self.api.get(child_id[0], child_id[1], namespace, child_id[2])
        return None if obj is None else (self.cache.observe(obj) or compact(obj))

    def live(self, owner: Owner, child: Child, children: list[Child], memory: ChildMemory) -> Live | None:
        """The child as the watches last reported it. When they do not know it: absent, once its kind's
        watch has listed everything (a create then fails if it exists after all: ``apply``); else read by
        name (not listed yet, or found to be someone else's object without our label). A stub is read only
        when it was not checked against its Certificate's current issuance yet (it is never watched), and
        not at all while that Certificate does not exist: a new owner's stub is created unread (a create
        fails if it exists: ``_ensure_stub``)."""
        unknown = child.key not in memory.unwatched
        if child.create_only:
            known = memory.stubs.get(child.key)
            filler = self._filler(child, children)
            if (
                known is not None
                and known[0] == self._stub_signature(owner, child, filler)
                and time.monotonic() - known[1] < self.recheck_seconds
            ):
                return known[2]
            if known is None and unknown and filler is not None and self._absent(owner, filler):
                return None
        else:
            rec = self.cache.get(owner.namespace, *child.key)
            if rec is not None:
                return rec
            if unknown and self.cache.synced(*child.key[:2]):
                return None
        rec = self.read(owner.namespace, child.key)
        if rec is None:
            memory.unwatched.discard(child.key)
        return rec

    def _absent(self, owner: Owner, child: Child) -> bool:
        """The watches have listed the child's kind and do not know the child."""
        return self.cache.synced(*child.key[:2]) and self.cache.get(owner.namespace, *child.key) is None

    @staticmethod
    def _filler(child: Child, children: list[Child]) -> Child | None:
        """The Certificate that cert-manager fills the stub ``child`` for, if any."""
        name = child.key[2]
        return next(
            (
                x
                for x in children
                if x.manifest["kind"] == "Certificate" and x.manifest["spec"]["secretName"] == name
            ),
            None,
        )

    def _stub_signature(self, owner: Owner, child: Child, filler: Child | None) -> tuple[str, str]:
        """A stub needs a look again when its metadata should change or when the Certificate that fills it
        was issued again (cert-manager writes the Secret, re-creating a deleted one, then counts the
        issuance in the Certificate's ``status.revision``; its other status updates do not touch it)."""
        cert = self.cache.get(owner.namespace, *filler.key) if filler is not None else None
        issued = f"{cert.uid}/{(cert.obj.get('status') or {}).get('revision', 0)}" if cert is not None else ""
        return c.digest(meta_only(child.manifest)), issued

    def prune(
        self,
        owner: Owner,
        wanted: set[ChildId],
        kinds: Iterable[tuple[str, str]],
        selector: str,
        secrets: Iterable[str],
        memory: ChildMemory,
    ) -> None:
        """Delete what the owner controls and no longer wants: its children of ``kinds`` as the watches know
        them (listed by ``selector`` where no watch feeds a kind), and the Secrets named ``secrets``."""
        for api_version, kind in kinds:
            found: Iterable[dict[str, Any]]
            if self.cache.covers(api_version, kind):  # the watches know every child of ours of this kind
                found = [
                    r.obj
                    for r in self.cache.controlled_by(owner.uid)
                    if (r.obj["apiVersion"], r.obj["kind"]) == (api_version, kind)
                ]
            else:
                # deleting as it goes is safe when an expired page token starts the list over
                found = self.api.each(api_version, kind, owner.namespace, selector)
            for item in found:
                meta = item["metadata"]
                if controlled_by(owner, item) and (api_version, kind, meta["name"]) not in wanted:
                    log.info("%s/%s: pruning %s %s", owner.namespace, owner.name, kind, meta["name"])
                    self.api.delete(api_version, kind, owner.namespace, meta["name"], uid=meta.get("uid"))
        # Secrets are never listed (the operator may not enumerate them): they go by name, once.
        for name in secrets:
            key = ("v1", "Secret", name)
            if key in wanted or key in memory.stubs_gone:
                continue
            secret = self.api.get("v1", "Secret", owner.namespace, name)
            if secret is not None and controlled_by(owner, secret):
                log.info("%s/%s: pruning Secret %s", owner.namespace, owner.name, name)
                self.api.delete("v1", "Secret", owner.namespace, name, uid=secret["metadata"].get("uid"))
            memory.stubs.pop(key, None)
            memory.stubs_gone.add(key)

    # ------------------------------------------------------------------------------------------ writes
    def apply_all(
        self, owner: Owner, children: list[Child], live: dict[ChildId, Live | None], memory: ChildMemory
    ) -> str | None:
        """Apply the children in order; the first refused one stops and is what the status reports."""
        for child in children:
            try:
                self.apply(owner, child, children, live, memory)
            except ApiError as exc:
                if exc.transient or exc.namespace_terminating:
                    raise
                kind, cname = child.manifest["kind"], child.manifest["metadata"]["name"]
                log.warning("%s/%s: applying %s %s failed: %s", owner.namespace, owner.name, kind, cname, exc)
                return f"{kind} {cname}: {exc.message or exc}"
        return None

    def apply(
        self,
        owner: Owner,
        child: Child,
        children: list[Child],
        live: dict[ChildId, Live | None],
        memory: ChildMemory,
        manager: str = FIELD_MANAGER,
    ) -> dict[str, Any] | None:
        """Apply one child unless it is as this manager last applied it: the object as the API server
        stored it, None when nothing was written (``live`` and ``memory`` follow)."""
        if child.create_only:
            return self._ensure_stub(
                child,
                live,
                memory,
                manager,
                self._stub_signature(owner, child, self._filler(child, children)),
            )
        wanted = c.digest(child.manifest)
        rec = live.get(child.key)
        if unchanged(rec, wanted, manager, memory.applied.get((child.key, manager))):
            return None  # as we applied it, and nobody changed a field of ours since
        obj = self._create(child, manager, memory) if rec is None else self._apply_or_replace(child, manager)
        rec = live[child.key] = self.cache.observe(obj) or compact(obj)
        memory.applied[(child.key, manager)] = applied(rec, wanted, manager)
        metrics.APPLIES.labels(kind=child.manifest["kind"]).inc()
        return obj

    def _ensure_stub(
        self,
        child: Child,
        live: dict[ChildId, Live | None],
        memory: ChildMemory,
        manager: str,
        signature: tuple[str, str],
    ) -> dict[str, Any] | None:
        """Create the stub when absent; keep its labels and owner references; never touch its data.
        ``signature``: what its state is checked against (_stub_signature), remembered with it."""
        rec = live.get(child.key)
        obj = None
        if rec is None:
            obj = self.api.create(child.creation())
            if obj is None:  # it exists (created since it was read, or not read): the next pass reads it
                memory.unwatched.add(child.key)
                raise ApiError(409, "Conflict", f"Secret {child.key[2]} appeared while being created")
            rec = compact(obj)
            metrics.APPLIES.labels(kind="Secret").inc()
        elif not meta_current(child.manifest, rec.obj):
            obj = self.api.apply(meta_only(child.manifest), manager)
            rec = compact(obj)
            metrics.APPLIES.labels(kind="Secret").inc()
        live[child.key] = rec
        known = memory.stubs.get(child.key)
        # The time of the last look, not of the last pass: a pass that took the stub from memory keeps it, or
        # passes coming faster than recheck_seconds would never read it again (and a hand edit would stay).
        looked = known[1] if known is not None and obj is None and rec is known[2] else time.monotonic()
        memory.stubs[child.key] = (signature, looked, rec)
        memory.stubs_gone.discard(child.key)
        return obj

    def _create(self, child: Child, manager: str, memory: ChildMemory) -> dict[str, Any]:
        """Apply a child believed absent, on the condition that it is: an apply carrying a resourceVersion
        creates a missing object (the API server ignores it then) and fails with 409 on an existing one
        (no object has the very first etcd revision). So an object of that name that the watches do not know
        (someone else's, without our label) is never written: it is read by name from then on, and the pass
        is retried, which checks whose it is."""
        meta = {**child.manifest["metadata"], "resourceVersion": ABSENT}
        try:
            return self.api.apply({**child.manifest, "metadata": meta}, manager)
        except ApiError as exc:
            if exc.status != 409:
                raise
            memory.unwatched.add(child.key)
            kind, name = child.key[1:]
            raise ApiError(409, "Conflict", f"{kind} {name} exists unknown to the watches", "create") from exc

    def _apply_or_replace(self, child: Child, manager: str) -> dict[str, Any]:
        """The object as the API server stored it."""
        try:
            return self.api.apply(child.manifest, manager)
        except ApiError as exc:
            # A 422 on an object whose content is entirely ours (not a Deployment's pod template nor a
            # fleet pool's BlazenPeer spec: they carry user input) means someone else's list items clash with
            # ours: overwrite them, then own the fields again by apply.
            if exc.status != 422 or child.manifest["kind"] in ("Deployment", s.KIND):
                raise
            log.info("apply of %s refused (%s); overwriting it", child.key, exc.message)
            if self.api.merge_replace(child.manifest) is None:
                raise
            return self.api.apply(child.manifest, manager)


class Reconciler:
    """Reconciles one BlazenPeer per call. Not reentrant for one object: the work queue never runs two passes
    of the same BlazenPeer at once."""

    def __init__(
        self,
        api: Api,
        operator: c.OperatorIdentity | None = None,
        trust: Trust | None = None,
        cache: ChildCache | None = None,
        recheck_seconds: float = 60.0,
    ) -> None:
        self.api = api
        self.operator = operator
        # Without one fed by watches, every child is read by name each pass (still no write when unchanged).
        self.cache = cache if cache is not None else ChildCache()
        self.trust = trust or Trust(api, cache=self.cache)
        self.recheck_seconds = recheck_seconds
        self.children = ChildApplier(api, self.cache, recheck_seconds)
        self._memory: dict[tuple[str, str], PeerMemory] = {}

    def reconcile(self, namespace: str, name: str) -> Outcome:
        started = time.monotonic()
        outcome = run_pass(self._reconcile, namespace, name)
        if outcome.gone:
            self._memory.pop((namespace, name), None)
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        return outcome

    # ------------------------------------------------------------------------------------------------
    def _reconcile(self, namespace: str, name: str) -> Outcome:
        api = self.api
        # Always read the object fresh: the status we compare against must be the latest.
        body = api.get(s.API_VERSION, s.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.trust.sync(namespace)  # the last BlazenPeer reading a trust bundle takes it along
            return Outcome(gone=True)
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        previous = body.get("status") or {}

        try:
            peer = Peer.from_body(body, operator=self.operator)
        except ValidationError as exc:
            observed = st.Observed(generation=generation, peer=None, invalid=validation_message(exc))
            return self._write_status(body, observed, previous)

        token_missing = None
        ref = peer.spec.auth.token_secret_ref
        if ref is not None:
            secret = api.get("v1", "Secret", namespace, ref.name)
            if secret is None:
                token_missing = f"token Secret {ref.name} does not exist"
            elif ref.key not in (secret.get("data") or {}):
                token_missing = f"token Secret {ref.name} has no key {ref.key!r}"

        rotation = self.trust.sync_if_due(namespace) if peer.spec.tls.enabled else None
        memory = self._memory.get((namespace, name))
        if memory is None or memory.uid != peer.uid:
            memory = self._memory[(namespace, name)] = PeerMemory(peer.uid)
        children = desired(peer)
        live = {child.key: self.children.live(peer, child, children, memory) for child in children}
        conflict = foreign_child(peer, children, live)
        apply_error = None if conflict else self.children.apply_all(peer, children, live, memory)
        if conflict is None and apply_error is None:
            self._prune(peer, children, memory)

        # As read before the pass, or as the apply returned them: status included, no second read.
        deployment = live.get(("apps/v1", "Deployment", c.deployment_name(peer)))
        certificate = live.get(("cert-manager.io/v1", "Certificate", c.server_cert_name(peer)))
        observed = st.Observed(
            generation=generation,
            peer=peer,
            apply_error=apply_error,
            conflict=conflict,
            token_missing=token_missing,
            deployment=deployment.obj if deployment else None,
            certificate=certificate.obj if certificate else None,
            pods=self._observe_pods(peer, deployment, memory),
            ca_rotation=rotation.condition(peer.name) if rotation is not None else None,
        )
        return self._write_status(body, observed, previous)

    def _prune(self, peer: Peer, children: list[Child], memory: PeerMemory) -> None:
        wanted = {child.key for child in children}
        selector = f"{c.PEER_LABEL}={peer.name}"
        self.children.prune(peer, wanted, PRUNABLE, selector, certs.stub_names(peer), memory)

    def _observe_pods(
        self, peer: Peer, deployment: Live | None, memory: PeerMemory
    ) -> tuple[st.PodReport, ...]:
        seen = observe_pods(
            self.api,
            memory.pods,
            deployment.obj if deployment else None,
            peer.namespace,
            c.selector_string(peer),
            peer.spec.ports.admin,
            self.recheck_seconds,
        )
        if seen is not memory.pods:
            memory.pods = seen
            for pod, report in seen.pods:
                self._keep_deletion_cost(pod, st.session_refs(report.info))
        return seen.reports

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
        return write_status(
            self.api, body, st.compute(observed, previous), previous, STATUS_KEYS, st.transitions
        )


def run_pass(one_pass: Callable[[str, str], Outcome], namespace: str, name: str) -> Outcome:
    """A BlazenPeer's or a BlazenFleet's pass, counted: a transient API error is retried, the namespace
    going away (and the object with it) ends the object's passes, any other error propagates."""
    try:
        outcome = one_pass(namespace, name)
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


def write_status(
    api: Api,
    body: dict[str, Any],
    new: dict[str, Any],
    previous: dict[str, Any],
    keys: set[str],
    transitions: Callable[[dict[str, Any], dict[str, Any]], list[st.Transition]],
) -> Outcome:
    """Patch the object's status to ``new`` only when it differs from the ``previous`` one (of which only
    the schema's ``keys`` count: the API server prunes the rest), then post the Events of its transitions."""
    current = {k: v for k, v in previous.items() if k in keys}
    if new == current:
        return Outcome()
    meta = body["metadata"]
    if api.apply_status(meta["namespace"], meta["name"], new, kind=body["kind"]) is None:
        return Outcome(gone=True)
    metrics.STATUS_WRITES.inc()
    for event in transitions(previous, new):
        api.post_event(body, event.type, event.reason, event.message)
    return Outcome()
