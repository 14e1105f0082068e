"""The namespace trust pass's cleanup decision (operator/blazen_operator/trust.py) on a recording fake API:
the trust ConfigMap (and with it, by garbage collection, the namespace CA) goes only when no BlazenPeer of the
namespace names the namespace CA any more."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from blazen_operator.trust import Trust

from tests.support.pki import CA

CM = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {
        "name": "blazen-trust",
        "namespace": "ns",
        "uid": "cm-uid",
        "labels": {"app.kubernetes.io/managed-by": "blazen-operator"},
    },
}


class Proceeded(Exception):
    """The pass went on to the CA objects (the fake answers nothing further)."""


class FakeApi:
    def __init__(self, peers: list[dict[str, Any]], configmap: dict[str, Any] | None) -> None:
        self.peers = peers
        self.configmap = configmap
        self.deleted: list[tuple[str, str, str | None]] = []

    def list(self, api_version: str, kind: str, namespace: str | None, selector: str | None = None) -> list:
        if kind == "ConfigMap":  # the user issuers' trust bundles: none
            return []
        if kind != "BlazenPeer":
            raise Proceeded(kind)
        return self.peers

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert (kind, name) == ("ConfigMap", "blazen-trust")
        return self.configmap

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> None:
        self.deleted.append((kind, name, uid))


def peer(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": f"{name}-uid"},
        "spec": {"image": "img", "entrypoint": "m", **spec},
    }


def test_the_last_peer_gone_takes_the_trust_configmap_along():
    api = FakeApi(
        [peer("corp", tls={"issuerRef": {"name": "corp"}, "trustBundle": {"configMap": {"name": "r"}}})], CM
    )
    Trust(api).sync("ns")  # type: ignore[arg-type]
    assert api.deleted == [("ConfigMap", "blazen-trust", "cm-uid")]


def test_a_configmap_the_operator_did_not_create_is_left_alone():
    foreign = {**CM, "metadata": {**CM["metadata"], "labels": {}}}
    api = FakeApi([], foreign)
    Trust(api).sync("ns")  # type: ignore[arg-type]
    assert api.deleted == []


def test_a_peer_the_models_refuse_still_keeps_the_namespace_ca():
    """An upgrade that makes a field stricter must not take the CA from BlazenPeers that still name it."""
    refused = peer("old", tls={"duration": "9000h"})  # tls.ca.duration must now outlive it
    api = FakeApi([refused], CM)
    with pytest.raises(Proceeded):
        Trust(api).sync("ns")  # type: ignore[arg-type]
    assert api.deleted == []


class Cluster:
    """A small API server: objects by (kind, name), server-side apply recording our fields as managedFields
    (the key paths of the manifest), creates that refuse an existing name, and every write request logged."""

    def __init__(self, peers: list[dict[str, Any]]) -> None:
        self.peers = peers
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.rv = 0

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        meta = obj["metadata"]
        meta.setdefault("uid", f"{obj['kind']}-{meta['name']}-uid")
        meta["resourceVersion"] = str(self.rv)
        self.objects[(obj["kind"], meta["name"])] = obj
        return copy.deepcopy(obj)

    def list(self, api_version: str, kind: str, namespace: str | None, selector: str | None = None) -> list:
        if kind == "BlazenPeer":
            return self.peers
        return [copy.deepcopy(o) for (k, _), o in self.objects.items() if k == kind]

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


def test_an_unchanged_namespace_ca_costs_no_write_and_drift_is_reverted():
    api = Cluster([peer("a"), peer("b")])
    told: list[tuple[str, list[str]]] = []
    trust = Trust(api, on_change=lambda ns, names: told.append((ns, names)))  # type: ignore[arg-type]
    waiting = trust.sync("ns")
    assert ("POST", "Secret", "blazen-ca") in api.writes, "the CA Secret stub is created"
    assert waiting is not None
    assert not waiting.settled, "until the CA is issued the passes come at the active interval"
    api.issue_ca(CA(name="blazen-ca.ns").cert_pem.decode())
    trust.sync("ns")  # the bundle gets the issued CA: the ConfigMap changes
    # each change of what the BlazenPeers show gives them a pass, not only the next resync
    assert told == [("ns", ["a", "b"]), ("ns", ["a", "b"])]
    api.writes.clear()
    first = trust.sync("ns")
    assert first is not None
    assert first.settled
    assert len(told) == 2, "an unchanged outcome wakes nobody"
    assert api.writes == [], (
        "a pass over an unchanged namespace writes nothing (and creates nothing that 409s)"
    )
    assert trust.sync("ns") == first
    assert api.writes == []

    # someone removes a field of ours from the CA Issuer: only that object is applied again
    issuer = api.objects[("Issuer", "blazen-ca")]
    issuer["metadata"]["managedFields"][-1]["fieldsV1"] = {"metadata": ["name"]}
    trust.sync("ns")
    assert api.writes == [("APPLY", "Issuer", "blazen-ca")]
