"""What the operator knows of its children between passes, from its label-selected child watches.

Each watched child is kept as a compact :class:`Live` record: the few fields the reconciler and status.py
read (:func:`project`, one projection per kind, copied out of the decoded object with its recurring strings
interned), plus what its ``managedFields`` say about who owns what. Full objects are not kept (1,000
BlazenPeers have ~12,000 children). The operator's child watches feed it (watches.py: a list, then every event
including deletions) and so do the operator's own applies, whichever is newer by resourceVersion. Before a
kind's first list is done, a child absent from the cache may still exist: the reconciler reads it by name
then. After it, an absent child of ours does not exist, or is someone else's object without our label (never
watched): the reconciler creates it with a precondition that fails if it exists (reconcile.py).

Thread-safe: the event loop writes while reconcile passes read in worker threads.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .apply import FIELD_MANAGER
from .builders.common import CONFIG_HASH_ANNOTATION, digest
from .kinds import MANAGED_BY, MANAGED_BY_LABEL

ChildKey = tuple[str, str, str, str]  # (namespace, apiVersion, kind, name)
# What one apply left: the object's uid, the digest of the manifest applied, our manager's fields' digest
# as the API server returned them.
Applied = tuple[str, str, str]

# What a record keeps: the one projection of a child, per kind. A field read elsewhere of a record (``.obj``)
# must be listed here, or it reads as absent.
_META = ("name", "namespace", "uid", "resourceVersion", "generation")
# every key of a reference our manifests set (meta_current compares them all); the owners' names, for
# the owners' follow-up passes
_OWNER_REF = ("apiVersion", "kind", "name", "uid", "controller", "blockOwnerDeletion")
# which Certificate cert-manager wrote a TLS Secret for (the reconciler's ownership check)
CERT_NAME_ANNOTATION = "cert-manager.io/certificate-name"
_ANNOTATIONS = (CERT_NAME_ANNOTATION,)
_CONDITION = ("type", "status", "reason", "message", "observedGeneration")


@dataclass(frozen=True)
class _Status:
    fields: tuple[str, ...]
    conditions: tuple[str, ...]  # the condition types read


# status.py (rollout, issuance), reconcile.py (the rollout signature, a Certificate's issuance count)
_STATUS: dict[str, _Status] = {
    "Deployment": _Status(
        ("observedGeneration", "replicas", "readyReplicas", "updatedReplicas", "availableReplicas"),
        ("Available", "Progressing", "ReplicaFailure"),
    ),
    "Certificate": _Status(("revision", "notAfter", "renewalTime"), ("Ready",)),
}
# status.py: which spec the Deployment's pod template carries
_TEMPLATE_ANNOTATIONS: dict[str, tuple[str, ...]] = {"Deployment": (CONFIG_HASH_ANNOTATION,)}


@dataclass(frozen=True, slots=True)
class Live:
    """One child as last seen.

    ``ours``: the digest of the fields each of our field managers owns by apply. A field someone else
    changes (or removes) leaves our manager's set, so the digest changes: that is how drift shows, without
    comparing values the API server may have normalized."""

    obj: dict[str, Any]
    ours: dict[str, str]

    @property
    def uid(self) -> str:
        return str(self.obj["metadata"].get("uid") or "")

    @property
    def resource_version(self) -> int:
        return _rv(self.obj)


def _rv(obj: dict[str, Any]) -> int:
    # resourceVersions are etcd revisions; an unparsable one never wins over a known one
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


def _pick(src: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    # The same names, kinds, label keys and values recur across thousands of records; one copy of each.
    return {sys.intern(k): _intern(src[k]) for k in keys if k in src}


def _intern(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


def project(obj: dict[str, Any]) -> dict[str, Any]:
    """What the operator reads of a child, copied out of the decoded object (nothing of it stays
    referenced)."""
    meta = obj.get("metadata") or {}
    kind = str(obj.get("kind"))
    small_meta = _pick(meta, _META)
    # our manifests' labels are compared in full (meta_current); a child carries few others
    small_meta["labels"] = _pick(meta.get("labels") or {}, meta.get("labels") or {})
    small_meta["ownerReferences"] = [_pick(ref, _OWNER_REF) for ref in meta.get("ownerReferences") or []]
    small_meta["annotations"] = _pick(meta.get("annotations") or {}, _ANNOTATIONS)
    small: dict[str, Any] = {
        "apiVersion": _intern(obj["apiVersion"]),
        "kind": _intern(kind),
        "metadata": small_meta,
    }
    if (status := _STATUS.get(kind)) is not None and "status" in obj:
        have = obj["status"] or {}
        small["status"] = _pick(have, status.fields)
        if "conditions" in have:
            small["status"]["conditions"] = [
                _pick(cond, _CONDITION)
                for cond in have["conditions"] or []
                if cond.get("type") in status.conditions
            ]
    if (notes := _TEMPLATE_ANNOTATIONS.get(kind)) is not None:
        template_meta = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
        small["spec"] = {
            "template": {"metadata": {"annotations": _pick(template_meta.get("annotations") or {}, notes)}}
        }
    return small


def compact(obj: dict[str, Any]) -> Live:
    meta = obj.get("metadata") or {}
    ours = {
        sys.intern(str(entry["manager"])): digest(entry.get("fieldsV1") or {})
        for entry in meta.get("managedFields") or []
        if entry.get("operation") == "Apply"
        and not entry.get("subresource")
        and str(entry.get("manager", "")).startswith(FIELD_MANAGER)
    }
    return Live(project(obj), ours)


def applied(rec: Live, wanted: str, manager: str) -> Applied:
    """What to remember of an apply of the manifest digested as ``wanted`` that returned ``rec``."""
    return (rec.uid, wanted, rec.ours.get(manager, ""))


def unchanged(rec: Live | None, wanted: str, manager: str, done: Applied | None) -> bool:
    """The object exists as we last applied this very manifest, and nobody changed a field of ours since
    (no field left our manager's set, and it is not a re-created object): applying again would be a no-op
    write."""
    return rec is not None and done == (rec.uid, wanted, rec.ours.get(manager))


def meta_only(manifest: dict[str, Any]) -> dict[str, Any]:
    """A create-only object's manifest reduced to the metadata the operator keeps up to date on it."""
    meta = manifest["metadata"]
    return {
        "apiVersion": manifest["apiVersion"],
        "kind": manifest["kind"],
        "metadata": {k: meta[k] for k in ("name", "namespace", "labels", "ownerReferences") if k in meta},
    }


def meta_current(manifest: dict[str, Any], obj: dict[str, Any]) -> bool:
    """The live object carries the manifest's labels and owner references (a stub's metadata is all the
    operator keeps up to date on it)."""
    want, have = manifest["metadata"], obj["metadata"]
    labels = have.get("labels") or {}
    if any(labels.get(k) != v for k, v in (want.get("labels") or {}).items()):
        return False
    refs = {ref.get("uid"): ref for ref in have.get("ownerReferences") or []}
    return all(
        (got := refs.get(ref["uid"])) is not None and all(got.get(k) == v for k, v in ref.items())
        for ref in want.get("ownerReferences") or []
    )


class ChildCache:
    """Compact records of the watched children, by (namespace, apiVersion, kind, name), and by the uid of
    the BlazenPeer that controls them (for pruning)."""

    def __init__(self, kinds: Iterable[tuple[str, str]] = ()) -> None:
        self._kinds = frozenset(kinds)
        self._lock = threading.Lock()
        self._items: dict[ChildKey, Live] = {}
        self._by_owner: dict[str, set[ChildKey]] = {}
        self._synced: set[tuple[str, str]] = set()

    def covers(self, api_version: str, kind: str) -> bool:
        """Whether the watches feed this kind: only then is a record kept up to date (and deletions seen)."""
        return (api_version, kind) in self._kinds

    def synced(self, api_version: str, kind: str) -> bool:
        """Whether the watch of this kind has listed every labelled object once: from then on, an object of
        ours absent from the cache does not exist (or lost our label: then it is someone else's)."""
        return (api_version, kind) in self._synced

    def mark_synced(self, api_version: str, kind: str) -> None:
        self._synced.add((api_version, kind))

    def retain(self, api_version: str, kind: str, keep: set[ChildKey]) -> list[Live]:
        """After a full list of a kind: drop its records that the list did not return (deleted while the
        watch was not looking); returns them."""
        with self._lock:
            gone = [
                (key, rec)
                for key, rec in self._items.items()
                if key[1:3] == (api_version, kind) and key not in keep
            ]
            for key, rec in gone:
                self._unlink(key, rec)
                del self._items[key]
        return [rec for _, rec in gone]

    @staticmethod
    def key(obj: dict[str, Any]) -> ChildKey:
        meta = obj["metadata"]
        return (meta.get("namespace") or "", obj["apiVersion"], obj["kind"], meta["name"])

    def observe(self, obj: dict[str, Any]) -> Live | None:
        """Record an object seen by a watch or returned by an apply, unless a newer one is known. Only our
        labelled objects of watched kinds are kept: the watches report every later change of those."""
        if not self.covers(obj.get("apiVersion", ""), obj.get("kind", "")):
            return None
        if ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
            return None
        live = compact(obj)
        key = self.key(obj)
        with self._lock:
            old = self._items.get(key)
            if old is not None and old.resource_version > live.resource_version:
                return old
            self._unlink(key, old)
            self._items[key] = live
            owner = _controller_uid(live.obj)
            if owner:
                self._by_owner.setdefault(owner, set()).add(key)
        return live

    def forget(self, obj: dict[str, Any]) -> None:
        """A watch reported the object deleted (or no longer labelled as ours)."""
        if not self.covers(obj.get("apiVersion", ""), obj.get("kind", "")):
            return
        key = self.key(obj)
        uid = (obj.get("metadata") or {}).get("uid")
        with self._lock:
            old = self._items.get(key)
            # a deletion older than what we hold (the object was re-created since) changes nothing
            if old is None or old.uid != uid or old.resource_version > _rv(obj):
                return
            self._unlink(key, old)
            del self._items[key]

    def _unlink(self, key: ChildKey, old: Live | None) -> None:
        owner = _controller_uid(old.obj) if old is not None else None
        if owner and owner in self._by_owner:
            self._by_owner[owner].discard(key)
            if not self._by_owner[owner]:
                del self._by_owner[owner]

    def get(self, namespace: str, api_version: str, kind: str, name: str) -> Live | None:
        with self._lock:
            return self._items.get((namespace, api_version, kind, name))

    def controlled_by(self, uid: str) -> list[Live]:
        with self._lock:
            return [self._items[k] for k in self._by_owner.get(uid, ())]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None
