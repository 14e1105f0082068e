"""The child cache (operator/blazen_operator/cache.py): newer wins whatever order the watch and the operator's
own applies report an object in, a deletion older than the object held changes nothing, only our labelled
objects of watched kinds are kept, and a field someone else takes from our apply changes our digest."""

from __future__ import annotations

import copy
import json
from typing import Any

from blazen_operator.builders.common import CONFIG_HASH_ANNOTATION
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
    assert live.obj["spec"] == {"template": {"metadata": {"annotations": {}}}}  # no config hash: none kept
    assert live.obj["metadata"]["annotations"] == {}
    assert "managedFields" not in live.obj["metadata"]
    assert set(live.ours) == {"blazen-operator"}


# As the API server sends them (trimmed): every field below that the operator does not read must not stay.
DEPLOYMENT_JSON = """{"apiVersion": "apps/v1", "kind": "Deployment",
 "metadata": {"name": "bp-7", "namespace": "ns", "uid": "d-7", "resourceVersion": "41", "generation": 2,
  "creationTimestamp": "2026-12-01T06:00:00Z",
  "labels": {"app.kubernetes.io/managed-by": "blazen-operator", "blazen.dev/peer": "bp-7"},
  "annotations": {"deployment.kubernetes.io/revision": "2", "kubectl.kubernetes.io/last-applied": "{}"},
  "ownerReferences": [{"apiVersion": "blazen.dev/v1alpha1", "kind": "BlazenPeer", "name": "bp-7",
   "uid": "o-7", "controller": true, "blockOwnerDeletion": true}]},
 "spec": {"replicas": 2, "template": {"metadata": {"annotations": {"blazen.dev/config-hash": "h1",
  "other": "x"}, "labels": {"a": "b"}}, "spec": {"containers": [{"name": "peer"}]}}},
 "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 1,
  "availableReplicas": 1, "unavailableReplicas": 1, "collisionCount": 3, "terminatingReplicas": 0,
  "conditions": [
   {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
    "message": "Deployment has minimum availability.", "lastUpdateTime": "2026-12-01T06:00:05Z",
    "lastTransitionTime": "2026-12-01T06:00:05Z"},
   {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
    "message": "ReplicaSet has successfully progressed.", "lastUpdateTime": "2026-12-01T06:00:05Z",
    "lastTransitionTime": "2026-12-01T06:00:01Z"},
   {"type": "SomethingElse", "status": "True"}]}}"""
CERTIFICATE_JSON = """{"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
 "metadata": {"name": "bp-7-tls", "namespace": "ns", "uid": "c-7", "resourceVersion": "42", "generation": 1,
  "labels": {"app.kubernetes.io/managed-by": "blazen-operator", "blazen.dev/peer": "bp-7"},
  "ownerReferences": [{"apiVersion": "blazen.dev/v1alpha1", "kind": "BlazenPeer", "name": "bp-7",
   "uid": "o-7", "controller": true, "blockOwnerDeletion": true}]},
 "spec": {"secretName": "bp-7-tls", "dnsNames": ["bp-7.ns.svc"]},
 "status": {"notAfter": "2027-03-01T06:00:00Z", "notBefore": "2026-12-01T06:00:00Z",
  "renewalTime": "2027-01-30T06:00:00Z", "revision": 1, "nextPrivateKeySecretName": "bp-7-tls-abcde",
  "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "observedGeneration": 1,
   "message": "Certificate is up to date and has not expired",
   "lastTransitionTime": "2026-12-01T06:00:02Z"}]}}"""
META_7 = {
    "name": "bp-7",
    "namespace": "ns",
    "uid": "d-7",
    "resourceVersion": "41",
    "generation": 2,
    "labels": {"app.kubernetes.io/managed-by": "blazen-operator", "blazen.dev/peer": "bp-7"},
    "annotations": {},
    "ownerReferences": [
        {
            "apiVersion": "blazen.dev/v1alpha1",
            "kind": "BlazenPeer",
            "name": "bp-7",
            "uid": "o-7",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ],
}


def _containers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value, *(x for v in value.values() for x in _containers(v))]
    if isinstance(value, list):
        return [value, *(x for v in value for x in _containers(v))]
    return []


def test_a_record_keeps_only_the_fields_the_operator_reads() -> None:
    """At 1,000 BlazenPeers the records kept whole `status` maps (condition timestamps, counters nothing
    reads) and sub-objects of the decoded responses: 15-22 MB of decoded JSON stayed referenced."""
    dep = json.loads(DEPLOYMENT_JSON)
    rec = compact(dep)
    assert rec.obj == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": META_7,
        "spec": {"template": {"metadata": {"annotations": {CONFIG_HASH_ANNOTATION: "h1"}}}},
        "status": {
            "observedGeneration": 2,
            "replicas": 2,
            "updatedReplicas": 2,
            "readyReplicas": 1,
            "availableReplicas": 1,
            "conditions": [
                {
                    "type": "Available",
                    "status": "True",
                    "reason": "MinimumReplicasAvailable",
                    "message": "Deployment has minimum availability.",
                },
                {
                    "type": "Progressing",
                    "status": "True",
                    "reason": "NewReplicaSetAvailable",
                    "message": "ReplicaSet has successfully progressed.",
                },
            ],
        },
    }
    cert = compact(json.loads(CERTIFICATE_JSON))
    assert cert.obj["status"] == {
        "notAfter": "2027-03-01T06:00:00Z",
        "renewalTime": "2027-01-30T06:00:00Z",
        "revision": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Ready",
                "observedGeneration": 1,
                "message": "Certificate is up to date and has not expired",
            }
        ],
    }
    assert "spec" not in cert.obj
    # copied out: no map or list of the decoded response stays referenced by the record
    decoded = {id(x) for x in _containers(dep)}
    assert not [x for x in _containers(rec.obj) if id(x) in decoded]


def test_records_share_one_copy_of_recurring_strings() -> None:
    a, b = compact(json.loads(DEPLOYMENT_JSON)), compact(json.loads(CERTIFICATE_JSON))
    assert a.obj["metadata"]["labels"]["blazen.dev/peer"] is b.obj["metadata"]["labels"]["blazen.dev/peer"]
    assert a.obj["metadata"]["ownerReferences"][0]["uid"] is b.obj["metadata"]["ownerReferences"][0]["uid"]


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
        def each(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
            return copy.deepcopy(pods)

    seen = reconcile.observe_pods(Pods(), None, None, "ns", "app=bp", 9090, 60.0)  # type: ignore[arg-type]
    assert [pod for pod, _ in seen.pods] == [
        {"metadata": {"name": "bp-0", "namespace": "ns", "annotations": {}}},
        {"metadata": {"name": "bp-1", "namespace": "ns", "annotations": cost}},
    ]
    assert [r.ready for r in seen.reports] == [True, True]
