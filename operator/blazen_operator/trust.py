"""The namespace trust: the namespace CA objects, the trust bundle the pods read, and CA rotations.

One pass per namespace (``Trust.sync``): read the BlazenPeers that use the namespace CA, the trust ConfigMap
(bundle + rotation state), the CA Certificates and, during a rotation, the leaf Certificates and what every
ready pod reports on /v1/info; let :func:`rotation.step` decide; store the new state first (it is the
rotation's memory), then apply the CA objects, trigger leaf re-issues, delete retired CAs and post Events on
the ConfigMap. Passes run from BlazenPeer reconciles (``sync_if_due``) and from the operator's trust loop
(every few seconds during a rotation), one at a time per namespace.

Ownership: every namespace CA object is owned by the trust ConfigMap alone, which has no owner. The pass that
finds no BlazenPeer using the namespace CA any more deletes the ConfigMap, and the garbage collector the rest;
deleting one BlazenPeer of many changes nothing.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from . import rotation
from . import spec as s
from .apply import FIELD_MANAGER, Api, ApiError, path_for, read_peer_infos
from .builders import Peer, certs
from .builders import common as c
from .cache import Applied, ChildCache, ChildKey, Live, applied, compact, meta_current, meta_only, unchanged
from .kinds import MANAGED_BY, MANAGED_BY_LABEL, MANAGED_SELECTOR

log = logging.getLogger(__name__)
TRUST_MANAGER = f"{FIELD_MANAGER}-trust"
POD_SELECTOR = "app.kubernetes.io/name=blazen-peer"


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

    def condition(self, peer: str) -> tuple[Any, str, str]:
        if self.phase == "Idle":
            return "False", "Idle", self.progress
        msg = f"{self.reason}: {self.progress}" if self.reason else self.progress
        if pods := self.waiting.get(peer):
            msg += f"; this peer's pods not there yet: {', '.join(sorted(pods))}"
        return "True", self.phase, msg


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


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
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
        self._summary: dict[str, Summary] = {}
        # What this process applied to each namespace CA object (and the trust ConfigMap): a pass writes only
        # what is missing, changed or drifted, so an idle namespace costs reads only.
        self._applied: dict[ChildKey, Applied] = {}

    # ------------------------------------------------------------------------------------------ scheduling
    def _lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(namespace, threading.Lock())

    def _interval(self, namespace: str) -> float:
        summary = self._summary.get(namespace)
        return self.idle_interval if summary is None or summary.settled else self.active_interval

    def due(self) -> list[str]:
        """Namespaces whose next pass is due (the trust loop runs them)."""
        now = self._clock()
        with self._guard:
            known = list(self._last)
        return [ns for ns in known if now - self._last.get(ns, 0.0) >= self._interval(ns)]

    def sync_if_due(self, namespace: str) -> Summary | None:
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
        return self._summary.get(namespace)

    def sync(self, namespace: str) -> Summary | None:
        with self._lock(namespace):
            self._sync_locked(namespace)
        return self._summary.get(namespace)

    # ------------------------------------------------------------------------------------------ the pass
    def _sync_locked(self, namespace: str) -> None:
        api = self.api
        peers, unparsed = self._peers(namespace)
        configmap = api.get("v1", "ConfigMap", namespace, c.TRUST_CONFIGMAP)
        settings = certs.ca_settings(peers)
        if settings is None:
            if not unparsed:
                self._retire(namespace, configmap)
                return
            # Only BlazenPeers the models refuse (an upgrade made a field stricter) still name the namespace
            # CA: keep it, with the default lifetime, rather than take their certificates away.
            default = s.CA()
            settings = certs.CaSettings(default.duration, default.renew_before, unparsed[0])
        self._last[namespace] = self._clock()
        if configmap is None:
            api.create_if_absent(certs.trust_configmap(namespace), TRUST_MANAGER)
            configmap = api.get("v1", "ConfigMap", namespace, c.TRUST_CONFIGMAP)
            if configmap is None:
                raise ApiError(0, "NotFound", f"ConfigMap {c.TRUST_CONFIGMAP} vanished after its creation")
        labels = configmap["metadata"].get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) != MANAGED_BY:
            msg = (
                f"ConfigMap {namespace}/{c.TRUST_CONFIGMAP} exists and is not the operator's: "
                "delete or rename it"
            )
            self._summary[namespace] = Summary("Idle", "TrustBundleNotOwned", msg, {})
            log.warning("%s", msg)
            return
        annotations = configmap["metadata"].get("annotations") or {}
        data = configmap.get("data") or {}
        stored = rotation.Stored.load(annotations.get(certs.STATE_ANNOTATION), data.get(c.TRUST_KEY))

        certificates = api.list("cert-manager.io/v1", "Certificate", namespace, MANAGED_SELECTOR)
        secrets: dict[str, dict[str, Any] | None] = {}  # the CA Secrets read by name in this pass
        cas = self._cas(namespace, certificates, secrets)
        active = stored.phase != "Idle"
        world = rotation.World(
            now=self._now(),
            renew_before=dt.timedelta(seconds=settings.renew_before_seconds),
            request=annotations.get(certs.ROTATE_ANNOTATION),
            cas=cas,
            pods=self._pods(namespace, peers) if active else (),
            leaves=self._leaves(namespace, certificates) if active else (),
            settle=self.settle,
        )
        plan = rotation.step(stored, world)
        new = plan.stored
        summary = Summary(
            new.phase,
            new.reason,
            plan.progress,
            plan.waiting,
            settled=new.phase == "Idle" and bool(new.roots),
        )
        changed = summary != self._summary.get(namespace)
        self._summary[namespace] = summary

        progress = {"message": plan.progress, "waiting": plan.waiting}
        state = {
            certs.STATE_ANNOTATION: new.annotation(),
            certs.PROGRESS_ANNOTATION: json.dumps(progress, sort_keys=True, separators=(",", ":")),
            certs.SETTINGS_ANNOTATION: f"duration={settings.duration},renewBefore={settings.renew_before},"
            f"from={settings.source}",
        }
        # The state first: it is the rotation's memory, so a crash after it repeats the actions below.
        bundle = certs.trust_bundle(namespace, rotation.join_pem(new.roots), state)
        self._own(bundle, compact({**configmap, "apiVersion": "v1", "kind": "ConfigMap"}))
        owner = certs.owner_reference(configmap)
        live = (new.generation,) + ((new.target,) if new.target is not None else ())
        for gen in live:
            self._stub(certs.ca_secret_stub(namespace, owner, gen), secrets)
        for manifest in certs.namespace_ca(namespace, owner, settings, live, new.generation):
            self._own(manifest, self._live(manifest))
        for name in plan.reissue:
            self._reissue(namespace, name)
        for gen in plan.delete_generations:
            if gen not in live:
                self._delete_generation(namespace, gen)
        for type_, reason, message in plan.events:
            log.info("%s: %s: %s", namespace, reason, message)
            api.post_event({**configmap, "apiVersion": "v1", "kind": "ConfigMap"}, type_, reason, message)
        if changed and self._on_change is not None:
            self._on_change(namespace, [p.name for p in peers])

    def _peers(self, namespace: str) -> tuple[list[Peer], list[str]]:
        """The BlazenPeers on the namespace CA, and the names of those whose spec the models refuse but whose
        raw tls still names the namespace CA (their status reports the error)."""
        out, unparsed = [], []
        for body in self.api.list(s.API_VERSION, s.KIND, namespace):
            if body["metadata"].get("deletionTimestamp"):
                continue
            try:
                peer = Peer.from_body(body)
            except ValidationError:
                tls = (body.get("spec") or {}).get("tls") or {}
                on = isinstance(tls, dict) and tls.get("enabled", True) is not False
                if on and not tls.get("issuerRef"):
                    unparsed.append(body["metadata"]["name"])
                continue
            if c.uses_namespace_ca(peer):
                out.append(peer)
        return out, unparsed

    def _retire(self, namespace: str, configmap: dict[str, Any] | None) -> None:
        """No BlazenPeer uses the namespace CA any more: delete the trust ConfigMap; the garbage collector
        deletes the CA Issuers, Certificates and Secrets it owns."""
        self._last.pop(namespace, None)
        self._summary.pop(namespace, None)
        if configmap is None:
            return
        meta = configmap["metadata"]
        if (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY:
            log.info("%s: no BlazenPeer uses the namespace CA: deleting it", namespace)
            self.api.delete("v1", "ConfigMap", namespace, c.TRUST_CONFIGMAP, uid=meta.get("uid"))

    def _cas(
        self, namespace: str, certificates: list[dict[str, Any]], secrets: dict[str, dict[str, Any] | None]
    ) -> dict[int, rotation.CaCert]:
        """The CA generations that exist; the CA Secrets read on the way are left in ``secrets``."""
        out: dict[int, rotation.CaCert] = {}
        for cert in certificates:
            meta = cert["metadata"]
            if not (cert.get("spec") or {}).get("isCA"):
                continue
            label = (meta.get("labels") or {}).get(certs.CA_GENERATION_LABEL)
            if label is None and meta["name"] != c.CA_NAME:
                continue
            gen = int(label) if label and label.isdigit() else 1
            pem = None
            ready = _condition(cert, "Ready")
            if ready is not None and ready.get("status") == "True":
                name = cert["spec"].get("secretName") or meta["name"]
                secret = secrets[name] = self.api.get("v1", "Secret", namespace, name)
                pem = _b64((secret or {}).get("data"), "tls.crt")
                roots = rotation.split_pem(pem or "")
                pem = roots[0] if roots else None
            out[gen] = rotation.CaCert(pem, _time((cert.get("status") or {}).get("notAfter")))
        return out

    def _leaves(self, namespace: str, certificates: list[dict[str, Any]]) -> tuple[rotation.Leaf, ...]:
        out = []
        for cert in certificates:
            spec = cert.get("spec") or {}
            ref = spec.get("issuerRef") or {}
            if spec.get("isCA") or ref.get("name") != c.CA_NAME or ref.get("kind", "Issuer") != "Issuer":
                continue
            secret = self.api.get("v1", "Secret", namespace, spec.get("secretName") or "")
            roots = rotation.split_pem(_b64((secret or {}).get("data"), "ca.crt") or "")
            issuing = _condition(cert, "Issuing")
            out.append(
                rotation.Leaf(
                    cert["metadata"]["name"],
                    roots[0] if roots else None,
                    issuing is not None and issuing.get("status") == "True",
                )
            )
        return tuple(out)

    def _pods(self, namespace: str, peers: list[Peer]) -> tuple[rotation.PodTrust, ...]:
        """Every ready pod of the namespace-CA peers and what it reports. A pod that does not answer (or runs
        a runtime too old to report its trust) holds the rotation; the status names it."""
        admin = {p.name: p.spec.ports.admin for p in peers}
        targets = []
        for pod in self.api.list("v1", "Pod", namespace, POD_SELECTOR):
            meta = pod["metadata"]
            peer = (meta.get("labels") or {}).get("app.kubernetes.io/instance", "")
            status = pod.get("status") or {}
            ready = any(
                x.get("type") == "Ready" and x.get("status") == "True" for x in status.get("conditions") or []
            )
            if peer not in admin or meta.get("deletionTimestamp") or not ready or not status.get("podIP"):
                continue
            targets.append((peer, meta["name"], f"http://{status['podIP']}:{admin[peer]}/v1/info"))
        infos = read_peer_infos([url for _, _, url in targets])
        out = []
        for (peer, name, _), info in zip(targets, infos, strict=True):
            tls = (info or {}).get("tls")
            if not isinstance(tls, dict) or not isinstance(tls.get("trusted_sha256"), list):
                out.append(rotation.PodTrust(peer, name, None))
                continue
            trusted = frozenset(str(x) for x in tls["trusted_sha256"])
            out.append(rotation.PodTrust(peer, name, trusted, tls.get("leaf_root_sha256")))
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

    def _reissue(self, namespace: str, name: str) -> None:
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
                "message": "Certificate re-issuance triggered by blazen-operator: namespace CA rotation",
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
