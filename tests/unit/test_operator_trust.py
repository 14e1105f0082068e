"""The namespace trust pass's cleanup decision (operator/blazen_operator/trust.py) on a recording fake API:
the trust ConfigMap (and with it, by garbage collection, the namespace CA) goes only when no BlazenPeer of the
namespace names the namespace CA any more."""

from __future__ import annotations

from typing import Any

import pytest
from blazen_operator.trust import Trust

from tests.support.kube_fake import Cluster, stored_trust_configmap
from tests.support.pki import CA

CM = stored_trust_configmap()


class Proceeded(Exception):
    """The pass went on to the CA objects (the fake answers nothing further)."""


class FakeApi:
    def __init__(self, peers: list[dict[str, Any]], configmap: dict[str, Any] | None) -> None:
        self.peers = peers
        self.configmap = configmap
        self.deleted: list[tuple[str, str, str | None]] = []

    def each(
        self, api_version: str, kind: str, namespace: str | None, selector: str | None = None, **_: Any
    ) -> list:
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
