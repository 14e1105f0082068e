"""Which BlazenPeers an event on a child wakes (handlers._owners_to_wake): its controller; for the namespace
CA objects every BlazenPeer of the namespace co-owns, the first owner only, unless the object was deleted."""

from __future__ import annotations

from typing import Any

from blazen_operator.handlers import _owners_to_wake


def ref(name: str, controller: bool, kind: str = "BlazenPeer") -> dict[str, Any]:
    return {
        "apiVersion": "blazen.dev/v1alpha1",
        "kind": kind,
        "name": name,
        "uid": f"u-{name}",
        "controller": controller,
    }


def body(*refs: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "x", "namespace": "ns", "ownerReferences": list(refs)}}


def test_a_controlled_child_wakes_its_controller() -> None:
    assert _owners_to_wake(body(ref("a", True))) == ["a"]
    assert _owners_to_wake(body(ref("a", True)), deleted=True) == ["a"]


def test_a_shared_object_wakes_one_owner_unless_deleted() -> None:
    shared = body(ref("a", False), ref("b", False), ref("c", False))
    assert _owners_to_wake(shared) == ["a"]
    assert _owners_to_wake(shared, deleted=True) == ["a", "b", "c"]


def test_other_owners_are_not_ours() -> None:
    assert _owners_to_wake(body(ref("rs", True, kind="ReplicaSet"))) == []
    assert _owners_to_wake({"metadata": {}}) == []
