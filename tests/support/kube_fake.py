"""A small in-memory API server for the operator's trust passes (operator/blazen_operator/trust.py)."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable
from typing import Any

from blazen_operator.apply import ApiError, Paged
from blazen_operator.builders.certs import STATE_ANNOTATION, trust_bundle

PAGE = 2  # items a page: small, so the tests' few objects take several


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    """A label selector of ``k=v`` and ``k in (a,b)`` terms, as the API server reads it."""
    terms = re.findall(r"([^,=\s]+)\s*(?:=\s*([^,\s]+)|\s+in\s+\(([^)]*)\))", selector or "")
    return all(
        labels.get(key) == value if value else labels.get(key) in {v.strip() for v in choices.split(",")}
        for key, value, choices in terms
    )


def stored_trust_configmap(bundle: str = "", rotation_state: str | None = None) -> dict[str, Any]:
    """The namespace trust ConfigMap of namespace ``ns`` as the operator applies it (``trust_bundle``), as the
    API server stores it (uid ``cm-uid``): ``bundle`` as its ``ca.crt``, ``rotation_state`` (a
    ``rotation.Stored.annotation()``) as its rotation state."""
    annotations = {} if rotation_state is None else {STATE_ANNOTATION: rotation_state}
    configmap = trust_bundle("ns", bundle, annotations)
    configmap["metadata"]["uid"] = "cm-uid"
    return configmap


class Cluster:
    """A small API server: objects by (kind, name), server-side apply recording our fields as managedFields
    (the key paths of the manifest), creates that refuse an existing name, and every write request logged."""

    def __init__(self, peers: list[dict[str, Any]]) -> None:
        self.peers = peers
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.rv = 0
        self.pages: list[tuple[str, dict[str, Any]]] = []  # every list request: (kind, query)
        self.expire_first_token = True

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        meta = obj["metadata"]
        meta.setdefault("uid", f"{obj['kind']}-{meta['name']}-uid")
        meta["resourceVersion"] = str(self.rv)
        self.objects[(obj["kind"], meta["name"])] = obj
        return copy.deepcopy(obj)

    def each(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        selector: str | None = None,
        *,
        restarted: Callable[[], None] | None = None,
    ) -> Paged:
        """Lists as the API server pages them, two items a page; the first continue token this cluster
        hands out has expired by the time it comes back (410), so every caller's restart is exercised."""

        def request(method: str, path: str, *, query: dict[str, Any] | None = None, what: str = "") -> Any:
            self.pages.append((kind, dict(query or {})))
            token = (query or {}).get("continue") or ""
            if token and self.expire_first_token:
                self.expire_first_token = False
                raise ApiError(410, "Gone", "The provided continue parameter is too old", what)
            items = (
                copy.deepcopy(self.peers)
                if kind == "BlazenPeer"
                else [
                    copy.deepcopy(o)
                    for (k, _), o in self.objects.items()
                    if k == kind and matches(selector, o["metadata"].get("labels") or {})
                ]
            )
            start = int(token or 0)
            more = start + PAGE < len(items)
            meta = {"resourceVersion": str(self.rv), "continue": str(start + PAGE) if more else ""}
            return {"items": items[start : start + PAGE], "metadata": meta}

        return Paged(request, api_version, kind, namespace, selector, restarted)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj is not None else None

    def create(self, manifest: dict[str, Any], manager: str) -> dict[str, Any] | None:
        self.writes.append(("POST", manifest["kind"], manifest["metadata"]["name"]))
        if (manifest["kind"], manifest["metadata"]["name"]) in self.objects:
            return None
        return self._store(copy.deepcopy(manifest))

    def create_if_absent(self, manifest: dict[str, Any], manager: str) -> bool:
        return self.create(manifest, manager) is not None

    def apply(self, manifest: dict[str, Any], manager: str) -> dict[str, Any]:
        self.writes.append(("APPLY", manifest["kind"], manifest["metadata"]["name"]))
        old = self.objects.get((manifest["kind"], manifest["metadata"]["name"])) or {"metadata": {}}
        obj = {**old, **copy.deepcopy(manifest)}
        obj["metadata"] = {**old["metadata"], **copy.deepcopy(manifest["metadata"])}
        fields = {k: sorted(v) if isinstance(v, dict) else 1 for k, v in manifest.items()}
        others = [e for e in old["metadata"].get("managedFields") or [] if e["manager"] != manager]
        entry = {"manager": manager, "operation": "Apply", "fieldsV1": fields}
        obj["metadata"]["managedFields"] = [*others, entry]
        return self._store(obj)

    def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.writes.append((method, path, ""))
        return {}

    def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.writes.append(("EVENT", reason, message))

    def issue_ca(self, pem: str) -> None:
        """What cert-manager does: the CA Certificate Ready, its Secret filled."""
        cert = self.objects[("Certificate", "blazen-ca")]
        cert["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
        secret = self.objects[("Secret", "blazen-ca")]
        secret["data"] = {"tls.crt": base64.b64encode(pem.encode()).decode()}
