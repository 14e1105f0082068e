"""The child cache (operator/blazen_operator/cache.py): newer wins whatever order the watch and the operator's
own applies report an object in, a deletion older than the object held changes nothing, only our labelled
objects of watched kinds are kept, and a field someone else takes from our apply changes our digest."""

from __future__ import annotations

import copy
from typing import Any

from blazen_operator.cache import ChildCache, compact

DEP = ("apps/v1", "Deployment")
OWNER = "11111111-2222-3333-4444-555555555555"


def deployment(
    rv: int, uid: str = "d-1", fields: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    managed = [
        {
            "manager": "blazen-operator",
            "operation": "Apply",
            "fieldsV1": fields or {"f:spec": {"f:replicas": {}}},
        },
        {
            "manager": "kube-controller-manager",
            "operation": "Update",
            "subresource": "status",
            "fieldsV1": {"f:status": {"f:replicas": {}}},
        },
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "bp",
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": str(rv),
            "generation": 1,
            "labels": {"app.kubernetes.io/managed-by": "blazen-operator"},
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "ownerReferences": [{"uid": OWNER, "controller": True, "kind": "BlazenPeer", "name": "bp"}],
            "managedFields": managed,
            **meta,
        },
        "spec": {"replicas": 2, "template": {"metadata": {"annotations": {"h": "x"}}, "spec": {"big": 1}}},
        "status": {"replicas": 2, "readyReplicas": 1},
    }


def test_newer_wins_in_either_order() -> None:
    cache = ChildCache([DEP])
    cache.observe(deployment(10))
    cache.observe(deployment(5))  # a late watch event, older than an apply's answer
    assert cache.get("ns", *DEP, "bp").resource_version == 10
    cache.observe(deployment(12))
    assert cache.get("ns", *DEP, "bp").resource_version == 12


def test_an_older_deletion_or_another_objects_deletion_changes_nothing() -> None:
    cache = ChildCache([DEP])
    cache.observe(deployment(20, uid="d-2"))  # re-created since
    cache.forget(deployment(15, uid="d-1"))
    assert cache.get("ns", *DEP, "bp").uid == "d-2"
    cache.forget(deployment(21, uid="d-2"))
    assert cache.get("ns", *DEP, "bp") is None
    assert cache.controlled_by(OWNER) == []


def test_only_our_labelled_objects_of_watched_kinds_are_kept() -> None:
    cache = ChildCache([DEP])
    foreign = deployment(3)
    foreign["metadata"]["labels"] = {}
    assert cache.observe(foreign) is None
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": deployment(3)["metadata"]}
    assert cache.observe(secret) is None
    assert len(cache) == 0


def test_compact_keeps_what_a_pass_reads_and_drops_the_rest() -> None:
    live = compact(deployment(7))
    assert live.obj["status"] == {"replicas": 2, "readyReplicas": 1}
    assert live.obj["spec"] == {"template": {"metadata": {"annotations": {"h": "x"}}}}
    assert live.obj["metadata"]["annotations"] == {}
    assert "managedFields" not in live.obj["metadata"]
    assert set(live.ours) == {"blazen-operator"}


def test_a_field_taken_by_someone_else_changes_our_digest() -> None:
    before = compact(deployment(7))
    edited = deployment(8, fields={"f:spec": {}})  # `kubectl scale` took spec.replicas from our apply
    after = compact(edited)
    assert before.ours["blazen-operator"] != after.ours["blazen-operator"]
    status_only = copy.deepcopy(deployment(9))
    status_only["status"]["readyReplicas"] = 2
    assert compact(status_only).ours == before.ours, "status updates do not touch our fields"


def test_controlled_children_are_found_by_owner() -> None:
    cache = ChildCache([DEP])
    cache.observe(deployment(1))
    assert [r.obj["metadata"]["name"] for r in cache.controlled_by(OWNER)] == ["bp"]


def test_the_pods_a_blazenpeer_remembers_are_reduced_to_what_the_deletion_cost_patch_reads(
    monkeypatch,
) -> None:
    """Each BlazenPeer keeps its pods as last listed for the recheck period: whole pods (managedFields, spec,
    status) were tens of MB at 1,000 BlazenPeers."""
    from blazen_operator import reconcile
    from blazen_operator.builders import workload

    monkeypatch.setattr(reconcile, "read_peer_infos", lambda urls: [{"steps": []} for _ in urls])
    cost = {workload.DELETION_COST_ANNOTATION: "-3"}
    pods = [
        {
            "metadata": {
                "name": f"bp-{i}",
                "namespace": "ns",
                "annotations": {**cost, "other": "x" * 100} if i else {"other": "y"},
                "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {"containers": [{"name": "peer", "env": [{"name": "A", "value": "b" * 500}]}]},
            "status": {"podIP": f"10.0.0.{i}", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i in range(2)
    ]

    class Pods:
        def list(self, *_: Any) -> list[dict[str, Any]]:
            return copy.deepcopy(pods)

    seen = reconcile.observe_pods(Pods(), None, None, "ns", "app=bp", 9090, 60.0)  # type: ignore[arg-type]
    assert [pod for pod, _ in seen.pods] == [
        {"metadata": {"name": "bp-0", "namespace": "ns", "annotations": {}}},
        {"metadata": {"name": "bp-1", "namespace": "ns", "annotations": cost}},
    ]
    assert [r.ready for r in seen.reports] == [True, True]
