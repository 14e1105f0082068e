"""The namespace trust: the trust bundles the pods read, the namespace CA objects, and CA rotations.

One pass per namespace (``Trust.sync``), one step per trust bundle:
- the namespace CA's (ConfigMap ``blazen-trust``, for the BlazenPeers without ``tls.issuerRef``): read the
  trust ConfigMap (bundle + rotation state), the CA Certificates and, during a rotation, the leaf Certificates
  and what every ready pod that mounts the bundle reports on /v1/info; let :func:`rotation.step` decide;
  store the new state first (it is the rotation's memory), then apply the CA objects, trigger leaf re-issues,
  delete retired CAs and post Events on the ConfigMap;
- a user issuer's (``blazen-trust-<kind>-<issuer>``, for its BlazenPeers without ``tls.trustBundle``): the
  same step over what can be observed, the ca.crt of the issuer's leaf Secrets (the newest leaf's CA is the
  issuer's current CA); no CA objects, nothing to force.
BlazenPeers with ``tls.trustBundle`` read the user's bundle, which the operator never writes: their status
says so. Passes run from BlazenPeer reconciles (``sync_if_due``) and from the operator's trust loop (every few
seconds during a rotation), one at a time per namespace.

Ownership: every namespace CA object is owned by ``blazen-trust`` alone, which has no owner; nor has a user
issuer's bundle. The pass that finds no BlazenPeer reading a bundle any more deletes its ConfigMap (and the
garbage collector the namespace CA objects); deleting one BlazenPeer of many changes nothing.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import fleet_spec as fs
from . import rotation
from . import spec as s
from .apply import FIELD_MANAGER, Api, ApiError, path_for, read_peer_infos
from .builders import Peer, certs
from .builders import common as c
from .cache import Applied, ChildCache, ChildKey, Live, applied, compact, meta_current, meta_only, unchanged
from .kinds import MANAGED_BY, MANAGED_BY_LABEL, MANAGED_SELECTOR

log = logging.getLogger(__name__)
TRUST_MANAGER = f"{FIELD_MANAGER}-trust"
# The pods that read a trust bundle: the peers' and the fleet routers'.
POD_SELECTOR = "app.kubernetes.io/name in (blazen-peer,blazen-router)"
# The bundle of the BlazenPeers with tls.trustBundle: the user's, which the operator never writes.
USER_TRUST_BUNDLE = "tls.trustBundle"
USER_TRUST_BUNDLE_LIMIT = (
    "tls.trustBundle is the user's: the operator does not write it, so it cannot overlap a change of the "
    "issuer's CA; keep the old and the new root in it until every leaf is re-issued, then remove the old "
    "(docs/security.md)"
)


@dataclass(frozen=True)
class Summary:
    """The last pass's outcome for one namespace, which each BlazenPeer shows as its CARotation condition."""

    phase: rotation.Phase
    reason: str
    progress: str
    waiting: dict[str, list[str]]
    # Idle with the CA issued: nothing will change before the CA nears its expiry or a rotation is asked for
    # (until then the passes come at the active interval, so the pods get the bundle soon after the issuance).
    settled: bool = True
    # Idle for a reason the operator cannot act on (NoIssuerCA, UserTrustBundle, TrustBundleNotOwned): the
    # condition's reason instead of Idle.
    limit: str = ""

    def condition(self, peer: str) -> tuple[Any, str, str]:
        if self.phase == "Idle":
            return "False", self.limit or "Idle", self.progress
        msg = f"{self.reason}: {self.progress}" if self.reason else self.progress
        if pods := self.waiting.get(peer):
            msg += f"; this peer's pods not there yet: {', '.join(sorted(pods))}"
        return "True", self.phase, msg


@dataclass(frozen=True)
class View:
    """The last pass's outcome for one namespace: one Summary per trust bundle (by ConfigMap name, or
    ``tls.trustBundle``), and the bundle each BlazenPeer reads."""

    bundles: dict[str, Summary]
    readers: dict[str, str]

    @property
    def settled(self) -> bool:
        return all(x.settled for x in self.bundles.values())

    def condition(self, peer: str) -> tuple[Any, str, str] | None:
        summary = self.bundles.get(self.readers.get(peer, ""))
        return summary.condition(peer) if summary is not None else None


@dataclass(frozen=True)
class _Observed:
    leaf: rotation.Leaf
    issued: bool  # the Secret holds a certificate
    issued_at: str  # the Certificate's status.notBefore (RFC 3339: sorts as time)


@dataclass(frozen=True, slots=True)
class CertRecord:
    """What a pass reads of one of our Certificates: kept instead of the object (at 1,000 BlazenPeers the
    namespace's decoded Certificates, managedFields and all, were ~50 MB held for the whole pass)."""

    name: str
    uid: str
    generation: str | None  # the CA generation label
    is_ca: bool
    secret_name: str
    issuer: tuple[str, str, str]  # name, kind, group, with cert-manager's defaults
    ready: bool
    issuing: bool
    revision: Any
    not_before: str
    not_after: str | None

    @classmethod
    def of(cls, obj: dict[str, Any]) -> CertRecord:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        ref = spec.get("issuerRef") or {}
        return cls(
            name=meta["name"],
            uid=meta.get("uid") or "",
            generation=(meta.get("labels") or {}).get(certs.CA_GENERATION_LABEL),
            is_ca=bool(spec.get("isCA")),
            secret_name=spec.get("secretName") or "",
            issuer=(
                sys.intern(str(ref.get("name") or "")),
                sys.intern(str(ref.get("kind", "Issuer"))),
                sys.intern(str(ref.get("group", "cert-manager.io"))),
            ),
            ready=_condition(obj, "Ready") == "True",
            issuing=_condition(obj, "Issuing") == "True",
            revision=status.get("revision"),
            not_before=str(status.get("notBefore") or ""),
            not_after=status.get("notAfter"),
        )


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What a pass reads of a pod that reads trust bundles."""

    name: str
    owner: str  # the BlazenPeer, or the fleet's router Deployment
    bundles: frozenset[str]  # the ConfigMaps its volumes mount
    url: str | None  # its /v1/info; None unless it is ready, addressed, has an admin port, is not going

    @classmethod
    def of(cls, obj: dict[str, Any]) -> PodRecord:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        labels = meta.get("labels") or {}
        owner = labels.get("app.kubernetes.io/instance", "")
        if labels.get(fs.COMPONENT_LABEL) == "router":
            owner = f"{owner}-router"  # the fleet's router Deployment
        admin = next(
            (
                port.get("containerPort")
                for container in spec.get("containers") or []
                for port in container.get("ports") or []
                if port.get("name") == "admin"
            ),
            None,
        )
        ready = _condition(obj, "Ready") == "True"
        ip = status.get("podIP")
        live = ready and ip and admin is not None and not meta.get("deletionTimestamp")
        return cls(
            name=meta["name"],
            owner=owner,
            bundles=frozenset(
                name for v in spec.get("volumes") or [] if (name := (v.get("configMap") or {}).get("name"))
            ),
            url=f"http://{ip}:{admin}/v1/info" if live else None,
        )


class _Pass:
    """What one pass reads at most once: what it reads of the namespace's managed Certificates and of the
    pods, listed page by page."""

    def __init__(self, api: Api, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.listed_certificates: list[CertRecord] | None = None
        self._pods: list[PodRecord] | None = None

    def certificates(self) -> list[CertRecord]:
        if self.listed_certificates is None:
            self.listed_certificates = self.api.each(
                "cert-manager.io/v1", "Certificate", self.namespace, MANAGED_SELECTOR
            ).keep(CertRecord.of)
        return self.listed_certificates

    def pods(self) -> list[PodRecord]:
        if self._pods is None:
            self._pods = self.api.each("v1", "Pod", self.namespace, POD_SELECTOR).keep(PodRecord.of)
        return self._pods


class PeerReaders:
    """What a pass needs of the namespace's BlazenPeers (not being deleted), folded in one at a time so
    that none is held: the trust bundle each reads, the user issuers whose bundles are the operator's, the
    strictest namespace CA settings. For those whose spec the models refuse (their status reports the
    error): the names of those whose raw tls still names the namespace CA, and the user issuers' trust
    bundles the others still read; kept rather than taken from their pods."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Nothing seen; also when the list starts over (an expired page token): its BlazenPeers return."""
        self.readers: dict[str, str] = {}  # BlazenPeer -> the trust bundle it reads
        self.issuers: dict[str, s.IssuerRef] = {}  # a user issuer's trust bundle -> the issuer
        self.settings: certs.CaSettings | None = None
        self.unparsed: list[str] = []
        self.unparsed_bundles: set[str] = set()

    def add(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        try:
            p = Peer.from_body(body)
        except ValidationError:
            tls = (body.get("spec") or {}).get("tls") or {}
            on = isinstance(tls, dict) and tls.get("enabled", True) is not False
            if on and not tls.get("issuerRef"):
                self.unparsed.append(meta["name"])
            elif on and not tls.get("trustBundle"):
                # an issuerRef the models refuse too names no bundle the operator could have made
                with contextlib.suppress(ValidationError):
                    self.unparsed_bundles.add(
                        c.issuer_trust_configmap(s.IssuerRef.model_validate(tls["issuerRef"]))
                    )
            return
        tls = p.spec.tls
        if (bundle := c.trust_configmap(p)) is not None:
            self.readers[p.name] = bundle
            if tls.issuer_ref is not None:
                self.issuers[bundle] = tls.issuer_ref
        elif tls.enabled and tls.trust_bundle is not None:
            self.readers[p.name] = USER_TRUST_BUNDLE
        self.settings = certs.strictest(self.settings, certs.ca_request(p))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _b64(data: dict[str, Any] | None, key: str) -> str | None:
    raw = (data or {}).get(key)
    if not raw:
        return None
    try:
        return base64.b64decode(raw).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def _time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition(obj: dict[str, Any], type_: str) -> str | None:
    """The status of the object's condition ``type_``."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return str(cond.get("status"))
    return None


def _peer_owned(obj: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(
        r.get("kind") == s.KIND and str(r.get("apiVersion", "")).startswith(f"{s.GROUP}/") for r in refs
    )


def _stray_owners(manifest: dict[str, Any], obj: dict[str, Any]) -> bool:
    """A namespace CA object (they name their owner; the trust ConfigMap names none) that still carries the
    per-BlazenPeer owner references earlier versions put on it."""
    return "ownerReferences" in manifest["metadata"] and _peer_owned(obj)


class Trust:
    """Thread-safe: one pass at a time per namespace; passes of different namespaces run side by side."""

    def __init__(
        self,
        api: Api,
        *,
        cache: ChildCache | None = None,
        idle_interval: float = 30.0,
        active_interval: float = 5.0,
        settle: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _utcnow,
        on_change: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.api = api
        # The watches feed it the namespace CA Issuers and Certificates; without it they are read by name.
        self.cache = cache if cache is not None else ChildCache()
        self.idle_interval = idle_interval
        self.active_interval = active_interval
        self.settle = dt.timedelta(seconds=settle)
        self._clock = clock
        self._now = now
        # Told (namespace, the BlazenPeers on its CA) after a pass that changed the outcome their CARotation
        # condition shows: a pass run by the trust loop or by another BlazenPeer's reconcile is otherwise seen
        # only at their next pass (the resync), which then writes a status that is long stale.
        self._on_change = on_change
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._last: dict[str, float] = {}
        self._view: dict[str, View] = {}
        # A leaf Secret's CA as last read, by its Certificate's issuance (revision, notBefore, uid).
        self._leaf_cas: dict[tuple[str, str], tuple[Any, str | None, bool]] = {}
        # What this process applied to each namespace CA object (and the trust ConfigMap): a pass writes only
        # what is missing, changed or drifted, so an idle namespace costs reads only.
        self._applied: dict[ChildKey, Applied] = {}

    # ------------------------------------------------------------------------------------------ scheduling
    def _lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(namespace, threading.Lock())

    def _interval(self, namespace: str) -> float:
        view = self._view.get(namespace)
        return self.idle_interval if view is None or view.settled else self.active_interval

    def due(self) -> list[str]:
        """Namespaces whose next pass is due (the trust loop runs them)."""
        now = self._clock()
        with self._guard:
            known = list(self._last)
        return [ns for ns in known if now - self._last.get(ns, 0.0) >= self._interval(ns)]

    def sync_if_due(self, namespace: str) -> View | None:
        """From a BlazenPeer's reconcile: a pass when none ran recently (and none is running), else the last
        outcome."""
        last = self._last.get(namespace)
        if last is None or self._clock() - last >= self._interval(namespace):
            lock = self._lock(namespace)
            if lock.acquire(blocking=last is None):
                try:
                    self._sync_locked(namespace)
                finally:
                    lock.release()
        return self._view.get(namespace)

    def sync(self, namespace: str) -> View | None:
        with self._lock(namespace):
            self._sync_locked(namespace)
        return self._view.get(namespace)

    # ------------------------------------------------------------------------------------------ the pass
    def _sync_locked(self, namespace: str) -> None:
        peers = self._peers(namespace)
        readers, issuers, settings = peers.readers, peers.issuers, peers.settings
        if settings is None and peers.unparsed:
            # Only BlazenPeers the models refuse (an upgrade made a field stricter) still name the namespace
            # CA: keep it, with the default lifetime, rather than take their certificates away.
            default = s.CA()
            settings = certs.CaSettings(default.duration, default.renew_before, peers.unparsed[0])
        if settings is None:
            self._retire(namespace, c.TRUST_CONFIGMAP)
        if not readers and settings is None and not peers.unparsed_bundles:
            self._retire_issuers(namespace, set())
            self._last.pop(namespace, None)
            self._view.pop(namespace, None)
            return
        self._last[namespace] = self._clock()
        ctx = _Pass(self.api, namespace)
        bundles: dict[str, Summary] = {}
        if settings is not None:
            bundles[c.TRUST_CONFIGMAP] = self._namespace_ca(ctx, settings)
        for name, ref in sorted(issuers.items()):
            bundles[name] = self._user_issuer(ctx, name, ref)
        self._retire_issuers(namespace, set(issuers) | peers.unparsed_bundles)
        if ctx.listed_certificates is not None:  # forget the leaves that are gone
            live = {(namespace, x.secret_name) for x in ctx.listed_certificates}
            for key in [k for k in self._leaf_cas if k[0] == namespace and k not in live]:
                del self._leaf_cas[key]
        if USER_TRUST_BUNDLE in readers.values():
            bundles[USER_TRUST_BUNDLE] = Summary(
                "Idle", "", USER_TRUST_BUNDLE_LIMIT, {}, limit="UserTrustBundle"
            )
        view = View(bundles, readers)
        changed = view != self._view.get(namespace)
        self._view[namespace] = view
        if changed and self._on_change is not None:
            self._on_change(namespace, list(readers))

    def _open(self, namespace: str, name: str) -> dict[str, Any] | Summary:
        """The trust ConfigMap, created when absent; a Summary saying so when it is not the operator's."""
        configmap = self.api.get("v1", "ConfigMap", namespace, name)
        if configmap is None:
            self.api.create_if_absent(certs.trust_configmap(namespace, name), TRUST_MANAGER)
            configmap = self.api.get("v1", "ConfigMap", namespace, name)
            if configmap is None:
                raise ApiError(0, "NotFound", f"ConfigMap {name} vanished after its creation")
        labels = configmap["metadata"].get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            msg = f"ConfigMap {namespace}/{name} exists and is not the operator's: delete or rename it"
            log.warning("%s", msg)
            return Summary("Idle", "", msg, {}, limit="TrustBundleNotOwned")
        return configmap

    def _rotate(
        self,
        ctx: _Pass,
        configmap: dict[str, Any],
        world: rotation.World,
        extra: dict[str, str],
    ) -> tuple[rotation.Plan, Summary]:
        """One step of the bundle's rotation: decide, and store the new state and bundle first (the
        rotation's memory, so a crash after it repeats the actions); the caller then does the actions (the
        namespace CA's objects first, so re-issued leaves are signed by the switched Issuer) and ``_act``."""
        meta = configmap["metadata"]
        stored = rotation.Stored.load(
            (meta.get("annotations") or {}).get(certs.STATE_ANNOTATION),
            (configmap.get("data") or {}).get(c.TRUST_KEY),
        )
        plan = rotation.step(stored, world)
        new = plan.stored
        progress = {"message": plan.progress, "waiting": plan.waiting}
        state = {
            certs.STATE_ANNOTATION: new.annotation(),
            certs.PROGRESS_ANNOTATION: json.dumps(progress, sort_keys=True, separators=(",", ":")),
            **extra,
        }
        bundle = certs.trust_bundle(ctx.namespace, rotation.join_pem(new.roots), state, meta["name"])
        self._own(bundle, compact({**configmap, "apiVersion": "v1", "kind": "ConfigMap"}))
        summary = Summary(
            new.phase,
            new.reason,
            plan.progress,
            plan.waiting,
            settled=new.phase == "Idle" and bool(new.roots),
        )
        return plan, summary

    def _act(self, ctx: _Pass, configmap: dict[str, Any], plan: rotation.Plan) -> None:
        """Trigger the leaf re-issues and post the Events (on the trust ConfigMap)."""
        name = configmap["metadata"]["name"]
        for leaf in plan.reissue:
            self._reissue(ctx.namespace, leaf, name)
        for type_, reason, message in plan.events:
            log.info("%s: %s: %s: %s", ctx.namespace, name, reason, message)
            self.api.post_event(
                {**configmap, "apiVersion": "v1", "kind": "ConfigMap"}, type_, reason, message
            )

    def _namespace_ca(self, ctx: _Pass, settings: certs.CaSettings) -> Summary:
        namespace = ctx.namespace
        configmap = self._open(namespace, c.TRUST_CONFIGMAP)
        if isinstance(configmap, Summary):
            return configmap
        annotations = configmap["metadata"].get("annotations") or {}
        stored = rotation.Stored.load(annotations.get(certs.STATE_ANNOTATION), None)
        secrets: dict[str, dict[str, Any] | None] = {}  # the CA Secrets read by name in this pass
        cas = self._cas(namespace, ctx.certificates(), secrets)
        active = stored.phase != "Idle"
        issuer = certs.namespace_issuer_ref()
        world = rotation.World(
            now=self._now(),
            renew_before=dt.timedelta(seconds=settings.renew_before_seconds),
            request=annotations.get(certs.ROTATE_ANNOTATION),
            cas=cas,
            pods=self._pods(ctx, c.TRUST_CONFIGMAP) if active else (),
            leaves=tuple(x.leaf for x in self._leaves(ctx, issuer, cached=False)) if active else (),
            settle=self.settle,
        )
        settings_note = (
            f"duration={settings.duration},renewBefore={settings.renew_before},from={settings.source}"
        )
        plan, summary = self._rotate(ctx, configmap, world, {certs.SETTINGS_ANNOTATION: settings_note})
        new = plan.stored
        owner = certs.owner_reference(configmap)
        live = (new.generation,) + ((new.target,) if new.target is not None else ())
        for gen in live:
            self._stub(certs.ca_secret_stub(namespace, owner, gen), secrets)
        for manifest in certs.namespace_ca(namespace, owner, settings, live, new.generation):
            self._own(manifest, self._live(manifest))
        for gen in plan.delete_generations:
            if gen not in live:
                self._delete_generation(namespace, gen)
        self._act(ctx, configmap, plan)
        return summary

    def _user_issuer(self, ctx: _Pass, name: str, ref: s.IssuerRef) -> Summary:
        """A user issuer's CA is not ours to rotate, only to observe: the CA of its newest leaf (the ca.crt
        cert-manager writes into the leaf Secret) is its current CA; a leaf on a CA the bundle lacks starts
        the same overlap as the namespace CA's (trust old + new, re-issue the rest, drop the old)."""
        configmap = self._open(ctx.namespace, name)
        if isinstance(configmap, Summary):
            return configmap
        stored = rotation.Stored.load(
            (configmap["metadata"].get("annotations") or {}).get(certs.STATE_ANNOTATION), None
        )
        issuer = {"name": ref.name, "kind": ref.kind, "group": ref.group}
        observed = self._leaves(ctx, issuer, cached=stored.phase == "Idle")
        dated = [x for x in observed if x.leaf.ca_pem]
        note = {certs.ISSUER_ANNOTATION: f"{ref.kind}/{ref.name} ({ref.group})"}
        if not dated:
            issued = bool(observed) and all(x.issued for x in observed)
            msg = (
                f"{ref.kind} {ref.name} writes no ca.crt into its leaf Secrets (ACME and other public CAs): "
                "nothing to overlap; the pods verify siblings against the system roots"
                if issued
                else f"waiting for {ref.kind} {ref.name} to issue the leaf certificates"
            )
            self._own(
                certs.trust_bundle(ctx.namespace, "", {**note, certs.PROGRESS_ANNOTATION: msg}, name),
                compact({**configmap, "apiVersion": "v1", "kind": "ConfigMap"}),
            )
            return Summary("Idle", "", msg, {}, settled=issued, limit="NoIssuerCA" if issued else "")
        newest = max(dated, key=lambda x: x.issued_at)
        world = rotation.World(
            now=self._now(),
            renew_before=dt.timedelta(0),
            request=None,  # nothing to force: the issuer, not the operator, decides its CA
            generations=False,
            cas={1: rotation.CaCert(newest.leaf.ca_pem)},
            pods=self._pods(ctx, name) if stored.phase != "Idle" else (),
            leaves=tuple(x.leaf for x in observed),
            settle=self.settle,
        )
        plan, summary = self._rotate(ctx, configmap, world, note)
        self._act(ctx, configmap, plan)
        return summary

    def _peers(self, namespace: str) -> PeerReaders:
        """What the pass needs of the namespace's BlazenPeers, page by page, one BlazenPeer at a time."""
        peers = PeerReaders()
        for body in self.api.each(s.API_VERSION, s.KIND, namespace, restarted=peers.clear):
            peers.add(body)
        return peers

    def _retire(self, namespace: str, name: str) -> None:
        """No BlazenPeer reads this trust ConfigMap any more: delete it (the namespace CA's takes the CA
        Issuers, Certificates and Secrets it owns along, by the garbage collector)."""
        configmap = self.api.get("v1", "ConfigMap", namespace, name)
        if configmap is None:
            return
        meta = configmap["metadata"]
        if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
            log.info("%s: no BlazenPeer reads the trust bundle %s any more: deleting it", namespace, name)
            self.api.delete("v1", "ConfigMap", namespace, name, uid=meta.get("uid"))

    def _retire_issuers(self, namespace: str, keep: set[str]) -> None:
        selector = f"{MANAGED_SELECTOR},{certs.ISSUER_BUNDLE_LABEL}=issuer"
        # deleting as it goes is safe when an expired page token starts the list over
        for configmap in self.api.each("v1", "ConfigMap", namespace, selector):
            meta = configmap["metadata"]
            labels = meta.get("labels") or {}
            if meta["name"] in keep or labels.get(certs.ISSUER_BUNDLE_LABEL) != "issuer":
                continue
            if labels.get(MANAGED_BY_LABEL) == MANAGED_BY:
                log.info(
                    "%s: no BlazenPeer reads the trust bundle %s any more: deleting it",
                    namespace,
                    meta["name"],
                )
                self.api.delete("v1", "ConfigMap", namespace, meta["name"], uid=meta.get("uid"))

    def _cas(
        self, namespace: str, certificates: list[CertRecord], secrets: dict[str, dict[str, Any] | None]
    ) -> dict[int, rotation.CaCert]:
        """The CA generations that exist; the CA Secrets read on the way are left in ``secrets``."""
        out: dict[int, rotation.CaCert] = {}
        for cert in certificates:
            if not cert.is_ca or (cert.generation is None and cert.name != c.CA_NAME):
                continue
            gen = int(cert.generation) if cert.generation and cert.generation.isdigit() else 1
            pem = None
            if cert.ready:
                name = cert.secret_name or cert.name
                secret = secrets[name] = self.api.get("v1", "Secret", namespace, name)
                pem = _b64((secret or {}).get("data"), "tls.crt")
                roots = rotation.split_pem(pem or "")
                pem = roots[0] if roots else None
            out[gen] = rotation.CaCert(pem, _time(cert.not_after))
        return out

    def _leaves(self, ctx: _Pass, issuer: dict[str, str], *, cached: bool) -> list[_Observed]:
        """The leaf Certificates of our BlazenPeers and routers that name ``issuer``, with the CA of each
        Secret. ``cached``: a Secret is read again only when its Certificate's issuance changed (an idle user
        issuer is observed every pass; a rotation reads every Secret every pass)."""
        out = []
        wanted = (issuer["name"], issuer["kind"], issuer["group"])
        for cert in ctx.certificates():
            if cert.is_ca or cert.issuer != wanted:
                continue
            key = (ctx.namespace, cert.secret_name)
            stamp = (cert.revision, cert.not_before or None, cert.uid or None)
            seen = self._leaf_cas.get(key)
            if not cached or seen is None or seen[0] != stamp:
                secret = self.api.get("v1", "Secret", ctx.namespace, cert.secret_name)
                data = (secret or {}).get("data")
                roots = rotation.split_pem(_b64(data, "ca.crt") or "")
                seen = self._leaf_cas[key] = (stamp, roots[0] if roots else None, bool(_b64(data, "tls.crt")))
            out.append(
                _Observed(
                    rotation.Leaf(cert.name, seen[1], cert.issuing),
                    issued=seen[2],
                    issued_at=cert.not_before,
                )
            )
        return out

    def _pods(self, ctx: _Pass, bundle: str) -> tuple[rotation.PodTrust, ...]:
        """Every ready pod that reads ``bundle`` (peers' and fleet routers': its trust volume names the
        ConfigMap) and what it reports. A pod that does not answer (or runs a runtime too old to report its
        trust) holds the rotation; the status names it."""
        targets = [p for p in ctx.pods() if bundle in p.bundles and p.url is not None]
        infos = read_peer_infos([p.url for p in targets if p.url is not None])
        out = []
        for pod, info in zip(targets, infos, strict=True):
            tls = (info or {}).get("tls")
            if not isinstance(tls, dict) or not isinstance(tls.get("trusted_sha256"), list):
                out.append(rotation.PodTrust(pod.owner, pod.name, None))
                continue
            trusted = frozenset(str(x) for x in tls["trusted_sha256"])
            out.append(rotation.PodTrust(pod.owner, pod.name, trusted, tls.get("leaf_root_sha256")))
        return tuple(out)

    # ------------------------------------------------------------------------------------------ actions
    def _live(self, manifest: dict[str, Any]) -> Live | None:
        """The object as the watches last reported it; read by name when they do not know it."""
        meta = manifest["metadata"]
        api_version, kind, namespace, name = (
            manifest["apiVersion"],
            manifest["kind"],
            meta["namespace"],
            meta["name"],
        )
        rec = self.cache.get(namespace, api_version, kind, name)
        if rec is None:
            obj = self.api.get(api_version, kind, namespace, name)
            rec = None if obj is None else (self.cache.observe(obj) or compact(obj))
        return rec

    def _own(self, manifest: dict[str, Any], rec: Live | None) -> None:
        """Apply, unless the object is as this process last applied this manifest and nobody changed a
        field of ours since; then strip the per-BlazenPeer owner references earlier versions put on the
        namespace CA."""
        meta = manifest["metadata"]
        key = (meta["namespace"], manifest["apiVersion"], manifest["kind"], meta["name"])
        wanted = c.digest(manifest)
        done = self._applied.get(key)
        if (
            rec is not None
            and not _stray_owners(manifest, rec.obj)
            and unchanged(rec, wanted, TRUST_MANAGER, done)
        ):
            return
        obj = self._disown_peers(manifest, self.api.apply(manifest, TRUST_MANAGER))
        self._applied[key] = applied(self.cache.observe(obj) or compact(obj), wanted, TRUST_MANAGER)

    def _stub(self, manifest: dict[str, Any], secrets: dict[str, dict[str, Any] | None]) -> None:
        """A CA Secret: created when absent (cert-manager fills it), then only its metadata kept; never
        watched, so read by name unless this pass read it already."""
        api, meta = self.api, manifest["metadata"]
        name = meta["name"]
        secret = secrets[name] if name in secrets else api.get("v1", "Secret", meta["namespace"], name)
        if secret is None:
            secret = api.create(manifest, TRUST_MANAGER) or api.get("v1", "Secret", meta["namespace"], name)
            if secret is None:
                return  # created and deleted since: the next pass looks again
        if meta_current(manifest, secret) and not _stray_owners(manifest, secret):
            return
        self._disown_peers(manifest, api.apply(meta_only(manifest), TRUST_MANAGER))

    def _disown_peers(self, manifest: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
        """The object without the per-BlazenPeer owner references earlier versions put on the namespace CA
        (a merge patch replaces the whole list)."""
        if not _stray_owners(manifest, live):
            return live
        meta = manifest["metadata"]
        return self.api.request(
            "PATCH",
            path_for(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"]),
            query={"fieldManager": TRUST_MANAGER},
            body={"metadata": {"ownerReferences": meta["ownerReferences"]}},
            content_type="application/merge-patch+json",
            what=f"own {manifest['kind']} {meta['name']}",
        )

    def _reissue(self, namespace: str, name: str, bundle: str) -> None:
        """What ``cmctl renew`` does: set the Certificate's Issuing condition; cert-manager issues a new
        certificate from the (now switched) CA Issuer."""
        cert = self.api.get("cert-manager.io/v1", "Certificate", namespace, name)
        if cert is None:
            return
        now = self._now().astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [
            x for x in (cert.get("status") or {}).get("conditions") or [] if x.get("type") != "Issuing"
        ]
        conditions.append(
            {
                "type": "Issuing",
                "status": "True",
                "reason": "ManuallyTriggered",
                "message": f"Certificate re-issuance triggered by blazen-operator: CA rotation of {bundle}",
                "lastTransitionTime": now,
                "observedGeneration": cert["metadata"].get("generation"),
            }
        )
        body = {
            "metadata": {"resourceVersion": cert["metadata"]["resourceVersion"]},
            "status": {"conditions": conditions},
        }
        self.api.request(
            "PATCH",
            path_for("cert-manager.io/v1", "Certificate", namespace, name, "status"),
            query={"fieldManager": TRUST_MANAGER},
            body=body,
            content_type="application/merge-patch+json",
            what=f"re-issue Certificate {name}",
        )

    def _delete_generation(self, namespace: str, gen: int) -> None:
        """Delete a retired CA's Certificate and Secret, if they are the namespace CA's."""
        name = certs.ca_name(gen)
        for api_version, kind in (("cert-manager.io/v1", "Certificate"), ("v1", "Secret")):
            obj = self.api.get(api_version, kind, namespace, name)
            if obj is None:
                continue
            refs = obj["metadata"].get("ownerReferences") or []
            if _peer_owned(obj) or any(
                r.get("name") == c.TRUST_CONFIGMAP and r.get("kind") == "ConfigMap" for r in refs
            ):
                log.info("%s: deleting the retired CA %s %s", namespace, kind, name)
                self.api.delete(api_version, kind, namespace, name, uid=obj["metadata"].get("uid"))
