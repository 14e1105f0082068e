"""The namespace trust pass's cleanup decision (operator/blazen_operator/trust.py) on a recording fake API:
the trust ConfigMap (and with it, by garbage collection, the namespace CA) goes only when no BlazenPeer of the
namespace names the namespace CA any more."""

from __future__ import annotations

from typing import Any

import pytest
from blazen_operator.trust import Trust

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
