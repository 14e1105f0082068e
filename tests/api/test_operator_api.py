"""The operator against a real kube-apiserver + etcd + kube-controller-manager (see tests/api/conftest.py)."""

from __future__ import annotations

import base64
import copy
import json
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator import kinds
from blazen_operator.apply import Api, ApiError, path_for
from blazen_operator.handlers import list_peers
from prometheus_client import REGISTRY

from tests.api.conftest import json_http_server
from tests.support.controlplane import eventually

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.api

BP = "blazen.dev/v1alpha1"
WATCH_LISTS = "blazen_operator_child_watch_lists_total"
SPEC = {"image": "reg.local/peer:1", "entrypoint": "blazen_examples.steps", "steps": ["examples::echo"]}


def manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": BP,
        "kind": "BlazenPeer",
        "metadata": {"name": name, "namespace": namespace, "labels": {"team": "ml"}},
        "spec": {**SPEC, **spec},
    }


def create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return api.request("POST", path_for(BP, "BlazenPeer", body["metadata"]["namespace"]), body=body)


def get(api: Api, kind: str, ns: str, name: str, api_version: str | None = None) -> dict[str, Any] | None:
    versions = {
        "BlazenPeer": BP,
        "Deployment": "apps/v1",
        "Certificate": "cert-manager.io/v1",
        "Issuer": "cert-manager.io/v1",
        "Role": "rbac.authorization.k8s.io/v1",
        "RoleBinding": "rbac.authorization.k8s.io/v1",
        "PodDisruptionBudget": "policy/v1",
        "NetworkPolicy": "networking.k8s.io/v1",
    }
    return api.get(api_version or versions.get(kind, "v1"), kind, ns, name)


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def events(api: Api, ns: str, name: str) -> list[dict[str, Any]]:
    items = api.collect("v1", "Event", ns).items
    return [
        e
        for e in items
        if e["involvedObject"].get("name") == name and e["involvedObject"]["kind"] == "BlazenPeer"
    ]


def merge_patch(api: Api, kind: str, ns: str, name: str, patch: dict, sub: str = "", api_version: str = BP):
    return api.request(
        "PATCH",
        path_for(api_version, kind, ns, name, sub),
        body=patch,
        content_type="application/merge-patch+json",
    )


# What only a BlazenFleet makes the operator call (tests/api/test_fleet_api.py checks each is used).
FLEET_VERBS = {
    ("create", "blazen.dev", "blazenpeers"),
    ("delete", "blazen.dev", "blazenpeers"),
    ("get", "blazen.dev", "blazenfleets"),
    ("patch", "blazen.dev", "blazenfleets/status"),
}

# What only a namespace CA rotation makes the operator call: re-issuing the leaves as `cmctl renew` does
# (tests/api/test_ca_rotation_api.py, with cert-manager's controller, checks each is used).
ROTATION_VERBS = {("patch", "cert-manager.io", "certificates/status")}

CHILDREN = [
    ("Deployment", "bp"),
    ("Service", "bp"),
    ("Service", "bp-peers"),
    ("ServiceAccount", "bp-peer"),
    ("Role", "bp-peer"),
    ("RoleBinding", "bp-peer"),
    ("Certificate", "bp-tls"),
    ("Certificate", "bp-client-tls"),
    ("Secret", "bp-tls"),
    ("Secret", "bp-client-tls"),
    ("PodDisruptionBudget", "bp"),
    ("NetworkPolicy", "bp"),
]


# ------------------------------------------------------------ schema


@pytest.mark.parametrize(
    ("spec", "name", "expected"),
    [
        ({"entrypoint": None}, "bp", "spec.entrypoint: Required value"),
        ({"entrypoint": "not a module"}, "bp", "spec.entrypoint"),
        ({"replicas": -1}, "bp", "spec.replicas"),
        ({"tls": {"enabled": False}}, "bp", "spec.auth.tokenSecretRef"),
        ({"tls": {"duration": "1h", "renewBefore": "2h"}}, "bp", "spec.tls.renewBefore"),
        ({"tls": {"ca": {"duration": "100h"}}}, "bp", "spec.tls.ca.renewBefore"),
        ({"tls": {"duration": "9000h"}}, "bp", "spec.tls.ca.duration"),
        ({"plaintextGrpc": {"enabled": True}}, "bp", "spec.plaintextGrpc.allowedFrom"),
        ({"ports": {"grpc": 9090}}, "bp", "spec.ports"),
        (
            {"hardware": {"gpu": 1}, "resources": {"limits": {"nvidia.com/gpu": 2}}},
            "bp",
            "spec.resources.limits",
        ),
        ({"disruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}, "bp", "spec.disruptionBudget"),
        ({"steps": ["a b"]}, "bp", "spec.steps[0]"),
        (
            {"pod": {"terminationGracePeriodSeconds": 10, "drainAdmitSeconds": 9}},
            "bp",
            "spec.pod.drainAdmitSeconds",
        ),
        ({"pod": {"terminationGracePeriodSeconds": 1}}, "bp", "spec.pod.terminationGracePeriodSeconds"),
        ({"rollout": {"strategy": "BlueGreen"}}, "bp", "spec.rollout.strategy"),
        ({"volumes": [{"name": "tmp", "emptyDir": {}}]}, "bp", "spec.volumes"),
        ({"volumeMounts": [{"name": "w", "mountPath": "/models"}]}, "bp", "spec.volumeMounts"),
        ({"volumes": [{"emptyDir": {}}]}, "bp", "spec.volumes[0].name"),
        ({"tls": {"trustBundle": {}}}, "bp", "spec.tls.trustBundle"),
        ({"steps": []}, "bp", "spec.steps"),
        ({"http": {"corsOrigins": ["https://app.example.com"]}}, "bp", "spec.http.auth"),
        ({"http": {"auth": "Token"}}, "bp", "spec.http.auth"),
        (
            {
                "tls": {"enabled": False},
                "auth": {"tokenSecretRef": {"name": "t"}},
                "http": {"auth": "ClientCertificate"},
            },
            "bp",
            "spec.http.auth",
        ),
        ({"http": {"auth": "Anonymous"}}, "bp", "spec.http.auth"),
        (
            {"tls": {"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}},
            "bp",
            "spec.auth.tokenSecretRef: Required value: with tls.issuerRef and no tls.trustBundle",
        ),
        (
            {
                "tls": {"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
                "auth": {"tokenSecretRef": {"name": "t"}},
                "http": {"auth": "ClientCertificate"},
            },
            "bp",
            'spec.http.auth: Invalid value: "object": spec.http.auth ClientCertificate with tls.issuerRef',
        ),
        ({}, "x" * 53, "metadata.name"),
    ],
)
def test_invalid_manifests_are_rejected_with_field_messages(api, namespace, spec, name, expected):
    body = manifest(name, namespace, **spec)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    with pytest.raises(ApiError) as info:
        create(api, body)
    assert info.value.status == 422
    assert expected in info.value.message, info.value.message


@pytest.mark.parametrize(
    "http",
    [
        {"corsOrigins": ["https://app.example.com"], "auth": "Unauthenticated"},
        {"corsOrigins": ["https://app.example.com"], "auth": "ClientCertificate"},
        {"auth": "ClientCertificate"},
        {},
    ],
)
def test_explicit_http_auth_decisions_are_accepted(api, namespace, http):
    created = create(api, manifest("bp", namespace, http=http))
    assert created["spec"]["http"].get("auth") == http.get("auth")


@pytest.mark.parametrize(
    "spec",
    [
        {
            "tls": {"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
            "auth": {"tokenSecretRef": {"name": "t"}},
        },
        {
            "tls": {
                "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"},
                "trustBundle": {"configMap": {"name": "roots"}},
            },
            "http": {"auth": "ClientCertificate"},
        },
    ],
    ids=["issuer-with-token", "issuer-with-trust-bundle"],
)
def test_an_issuer_without_ca_crt_is_accepted_with_a_token_or_a_trust_bundle(api, namespace, spec):
    created = create(api, manifest("bp", namespace, **spec))
    assert created["spec"]["tls"]["issuerRef"]["name"] == "letsencrypt"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_pass_the_api_servers_validation(api, namespace, path):
    for doc in yaml.safe_load_all(path.read_text()):
        doc["metadata"]["namespace"] = namespace
        api.request("POST", path_for(BP, doc["kind"], namespace), body=doc)  # BlazenPeers and a BlazenFleet


def test_defaults_are_applied_by_the_api_server(api, namespace):
    created = create(api, manifest("bp", namespace))
    spec = created["spec"]
    assert spec["replicas"] == 1
    assert spec["tls"]["enabled"] is True
    assert spec["tls"]["duration"] == "2160h"
    assert spec["ports"] == {"grpc": 50051, "http": 8080, "admin": 9090, "plaintextGrpc": 50052}
    assert spec["hardware"]["gpu"] == 0
    assert spec["plaintextGrpc"]["enabled"] is False
    assert spec["rollout"] == {"strategy": "Surge", "maxSurge": 1}
    assert spec["pod"]["terminationGracePeriodSeconds"] == 30
    assert spec["pod"]["drainAdmitSeconds"] == 10
    assert spec["networkPolicy"]["enabled"] is True
    assert spec["networkPolicy"]["adminAllowedFrom"] == [
        {"podSelector": {"matchLabels": {"blazen.dev/monitoring": "true"}}}
    ]
    assert "auth" not in spec["http"], "unset: the runtime's auto mode (token, else client certificate)"


# ------------------------------------------------------------ lifecycle


def test_create_reconciles_every_child_with_owner_references(api, operator, namespace):
    bp = create(api, manifest("bp", namespace, replicas=2))
    uid = bp["metadata"]["uid"]

    def children_exist():
        return all(get(api, kind, namespace, name) for kind, name in CHILDREN)

    eventually(children_exist, what="children")
    for kind, name in CHILDREN:
        obj = get(api, kind, namespace, name)
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("BlazenPeer", "bp", uid, True)
        ]
        assert obj["metadata"]["labels"]["team"] == "ml", "BlazenPeer labels propagate"

    dep = get(api, "Deployment", namespace, "bp")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][:3] == ["serve", "--entrypoint", "blazen_examples.steps"]
    assert c["args"][c["args"].index("--steps") + 1] == "examples::echo"
    assert c["args"][c["args"].index("--forward-dns") + 1] == f"bp-peers.{namespace}.svc"
    assert c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert {"name": "tls", "mountPath": "/etc/blazen/tls", "readOnly": True} in c["volumeMounts"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "bp-peer"

    # the namespace CA bootstrap: owned by the trust ConfigMap alone, which has no owner
    trust = eventually(lambda: get(api, "ConfigMap", namespace, "blazen-trust"), what="trust ConfigMap")
    assert not trust["metadata"].get("ownerReferences")
    for kind, name in [
        ("Issuer", "blazen-selfsigned"),
        ("Certificate", "blazen-ca"),
        ("Issuer", "blazen-ca"),
        ("Secret", "blazen-ca"),
    ]:
        obj = eventually(lambda kind=kind, name=name: get(api, kind, namespace, name), what=name)
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"]) for r in refs] == [("ConfigMap", trust["metadata"]["uid"])]
    assert {"name": "trust", "mountPath": "/etc/blazen/trust", "readOnly": True} in c["volumeMounts"]

    # status: the controller-manager creates 2 pods (they never run: no kubelet), cert-manager is absent
    def status_settled():
        st = get(api, "BlazenPeer", namespace, "bp")["status"]
        assert st["replicas"] == 2
        return st

    st = eventually(status_settled, what="status.replicas == 2")
    assert st["observedGeneration"] == 1
    assert st["readyReplicas"] == 0
    assert st["selector"] == "app.kubernetes.io/instance=bp,app.kubernetes.io/name=blazen-peer"
    assert st["endpoints"]["grpc"] == f"bp.{namespace}.svc:50051"
    assert st["endpoints"]["http"] == f"https://bp.{namespace}.svc:8080"
    assert st["phase"] == "Progressing"
    assert "servedSteps" not in st, "no pod answered /v1/info: unknown, not invented"
    conds = {c["type"]: c for c in st["conditions"]}
    assert set(conds) == {"Ready", "Available", "Progressing", "CertificateReady", "Degraded", "CARotation"}
    assert conds["Ready"]["status"] == "False"
    assert conds["CertificateReady"]["status"] == "False"
    assert conds["CertificateReady"]["reason"] in ("CertificatePending", "CertificateMissing")
    assert conds["Progressing"]["status"] == "True"
    assert conds["Degraded"]["status"] == "False"
    for c in conds.values():
        assert c["reason"]
        assert c["lastTransitionTime"]

    # no finalizer was ever added
    assert not get(api, "BlazenPeer", namespace, "bp")["metadata"].get("finalizers")


def test_certificate_ready_follows_the_certificate_status(api, operator, namespace):
    create(api, manifest("bp", namespace))
    cert = eventually(lambda: get(api, "Certificate", namespace, "bp-tls"), what="certificate")
    before = eventually(lambda: cond(get(api, "BlazenPeer", namespace, "bp"), "CertificateReady"))
    assert before["status"] == "False"
    time.sleep(1.1)  # lastTransitionTime has a 1 s resolution

    not_after, renewal = "2027-02-20T04:00:00Z", "2027-02-05T04:00:00Z"
    merge_patch(
        api,
        "Certificate",
        namespace,
        "bp-tls",
        {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Ready",
                        "message": "Certificate is up to date and has not expired",
                        "observedGeneration": cert["metadata"]["generation"],
                        "lastTransitionTime": "2026-11-22T04:00:00Z",
                    }
                ],
                "notAfter": not_after,
                "renewalTime": renewal,
            }
        },
        sub="status",
        api_version="cert-manager.io/v1",
    )

    def cert_ready():
        st = get(api, "BlazenPeer", namespace, "bp")["status"]
        assert cond({"status": st}, "CertificateReady")["status"] == "True"
        return st

    st = eventually(cert_ready, what="CertificateReady=True")
    assert st["certificate"]["notAfter"] == not_after
    assert st["certificate"]["renewalTime"] == renewal
    assert st["certificate"]["clientSecretName"] == "bp-client-tls"
    after = cond({"status": st}, "CertificateReady")
    assert after["lastTransitionTime"] != before["lastTransitionTime"], "moves on a change"
    # other conditions did not move
    ready_before = cond({"status": st}, "Ready")["lastTransitionTime"]
    time.sleep(4)  # more than a resync period
    st2 = get(api, "BlazenPeer", namespace, "bp")["status"]
    assert cond({"status": st2}, "Ready")["lastTransitionTime"] == ready_before
    assert cond({"status": st2}, "CertificateReady")["lastTransitionTime"] == after["lastTransitionTime"]
    eventually(
        lambda: any(e["reason"] == "CertificateIssued" for e in events(api, namespace, "bp")),
        what="CertificateIssued event",
    )


def test_spec_change_rolls_the_pod_template(api, operator, namespace):
    create(api, manifest("bp", namespace))
    dep = eventually(lambda: get(api, "Deployment", namespace, "bp"))
    old_hash = dep["spec"]["template"]["metadata"]["annotations"]["blazen.dev/config-hash"]
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp")["status"]["observedGeneration"] == 1)

    merge_patch(
        api, "BlazenPeer", namespace, "bp", {"spec": {"image": "reg.local/peer:2", "steps": ["a::b"]}}
    )

    def rolled():
        d = get(api, "Deployment", namespace, "bp")
        assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.local/peer:2"
        return d

    dep = eventually(rolled, what="new image in the template")
    assert dep["spec"]["template"]["metadata"]["annotations"]["blazen.dev/config-hash"] != old_hash
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--steps") + 1] == "a::b"
    # the controller-manager rolled out a new ReplicaSet for the new template
    replicasets = f"/apis/apps/v1/namespaces/{namespace}/replicasets"
    eventually(lambda: len(api.request("GET", replicasets)["items"]) == 2, what="second ReplicaSet")
    st = eventually(lambda: get(api, "BlazenPeer", namespace, "bp")["status"], what="status")
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp")["status"]["observedGeneration"] == 2)
    assert st["configHash"]


def test_token_secret_change_does_not_roll_the_pods(api, operator, namespace):
    """A rotated token reaches the pods through the mounted Secret (the runtime re-reads it): the template,
    and so the pods, stay as they are; no digest of the token is written anywhere."""
    create(api, manifest("bp", namespace, auth={"tokenSecretRef": {"name": "tok"}}))

    def degraded():
        c = cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")
        assert c["status"] == "True"
        assert c["reason"] == "TokenSecretMissing"
        return c

    eventually(degraded, what="TokenSecretMissing")
    eventually(lambda: any(e["reason"] == "TokenSecretMissing" for e in events(api, namespace, "bp")))

    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": namespace}}
    secret["data"] = {"token": base64.b64encode(b"one").decode()}
    api.request("POST", path_for("v1", "Secret", namespace), body=secret)
    eventually(lambda: cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")["status"] == "False")
    before = get(api, "Deployment", namespace, "bp")
    template = before["spec"]["template"]
    assert set(template["metadata"]["annotations"]) == {"blazen.dev/config-hash"}

    merge_patch(
        api,
        "Secret",
        namespace,
        "tok",
        {"data": {"token": base64.b64encode(b"two").decode()}},
        api_version="v1",
    )
    time.sleep(5)  # the Secret event reconciles the peer (it used to roll the pods within a second)
    after = get(api, "Deployment", namespace, "bp")
    assert after["spec"]["template"] == template
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert len(replicasets(api, namespace)) == 1


def _mark_pods_ready(
    api: Api, namespace: str, template_hash: str | None = None, ips: dict[str, str] | None = None
) -> int:
    """Play the kubelet: set Ready on the peer's pods (of one ReplicaSet when ``template_hash`` is given),
    with a pod IP from ``ips`` when given."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    n = 0
    for pod in api.collect("v1", "Pod", namespace).items:
        labels = pod["metadata"].get("labels") or {}
        if template_hash is not None and labels.get("pod-template-hash") != template_hash:
            continue
        status = {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            ],
        }
        if ips is not None:
            status["podIP"] = ips[pod["metadata"]["name"]]
        merge_patch(api, "Pod", namespace, pod["metadata"]["name"], {"status": status}, "status", "v1")
        n += 1
    return n


def replicasets(api: Api, namespace: str) -> list[dict[str, Any]]:
    # not a kind the operator touches, so not in its table: a raw path
    return api.request("GET", f"/apis/apps/v1/namespaces/{namespace}/replicasets")["items"]


def test_status_is_not_ready_until_the_rollout_completes(api, operator, namespace):
    """Surge by default (maxUnavailable 0): during a spec change the old pod keeps serving and the
    BlazenPeer stays Progressing / not Ready (observedGeneration current) until the new pod is ready."""
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": namespace}}
    secret["data"] = {"token": base64.b64encode(b"one").decode()}
    api.request("POST", path_for("v1", "Secret", namespace), body=secret)
    create(api, manifest("bp", namespace, tls={"enabled": False}, auth={"tokenSecretRef": {"name": "tok"}}))
    dep = eventually(lambda: get(api, "Deployment", namespace, "bp"))
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 1, what="first pod")
    _mark_pods_ready(api, namespace)
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp")["status"]["phase"] == "Ready", what="Ready")

    merge_patch(api, "BlazenPeer", namespace, "bp", {"spec": {"image": "reg.local/peer:2"}})
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 2, what="surge pod")

    def rolling():
        st = get(api, "BlazenPeer", namespace, "bp")["status"]
        assert st["observedGeneration"] == 2
        assert st["phase"] == "Progressing"
        assert cond({"status": st}, "Ready")["status"] == "False"
        assert cond({"status": st}, "Available")["reason"] == "PreviousPodsServing"
        return st

    eventually(rolling, what="Progressing while the new pod is not ready")
    time.sleep(3)  # more reconciles (pod and Deployment events): still not Ready
    st = rolling()
    assert st["updatedReplicas"] == 1
    assert st["readyReplicas"] == 1  # the old pod
    new_rs = [
        rs
        for rs in replicasets(api, namespace)
        if rs["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.local/peer:2"
    ]
    assert len(new_rs) == 1
    assert _mark_pods_ready(api, namespace, new_rs[0]["metadata"]["labels"]["pod-template-hash"]) == 1

    def done():
        st = get(api, "BlazenPeer", namespace, "bp")["status"]
        assert st["phase"] == "Ready", st
        assert (st["updatedReplicas"], st["readyReplicas"], st["replicas"]) == (1, 1, 1)
        assert cond({"status": st}, "Available")["reason"] == "MinimumReplicasAvailable"
        return st

    eventually(done, what="Ready once the new pod serves and the old one is gone")


def test_scale_down_prefers_pods_without_session_refs(api, operator, namespace, monkeypatch):
    """The pods' own reports (/v1/info session_refs; here answered for the pods the test made ready) become
    each pod's deletion cost and the status' sessionRefs; scaling 3 -> 1 keeps the pod holding refs."""
    from blazen_operator import reconcile

    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": namespace}}
    secret["data"] = {"token": base64.b64encode(b"one").decode()}
    api.request("POST", path_for("v1", "Secret", namespace), body=secret)
    create(
        api,
        manifest(
            "bp", namespace, replicas=3, tls={"enabled": False}, auth={"tokenSecretRef": {"name": "tok"}}
        ),
    )
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 3, what="three pods")
    names = sorted(p["metadata"]["name"] for p in api.collect("v1", "Pod", namespace).items)
    keeper = names[1]
    ips = {name: f"10.9.0.{i + 1}" for i, name in enumerate(names)}
    refs = {ips[name]: (5 if name == keeper else 0) for name in names}
    monkeypatch.setattr(
        reconcile,
        "read_peer_infos",
        lambda urls: [
            {"steps": ["examples::echo"], "session_refs": refs[u.split("/")[2].split(":")[0]]} for u in urls
        ],
    )
    _mark_pods_ready(api, namespace, ips=ips)

    def costs():
        out = {
            p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(
                "controller.kubernetes.io/pod-deletion-cost"
            )
            for p in api.collect("v1", "Pod", namespace).items
        }
        assert out == {name: ("5" if name == keeper else "0") for name in names}
        return out

    eventually(costs, what="deletion costs from the pods' reports")
    st = eventually(lambda: get(api, "BlazenPeer", namespace, "bp")["status"].get("sessionRefs"))
    assert st == {name: (5 if name == keeper else 0) for name in names}

    merge_patch(api, "BlazenPeer", namespace, "bp", {"spec": {"replicas": 1}}, "scale")
    eventually(
        lambda: [p["metadata"]["name"] for p in api.collect("v1", "Pod", namespace).items] == [keeper],
        what="the pod with refs is the one kept",
    )


def test_scale_subresource(api, operator, namespace):
    create(api, manifest("bp", namespace, replicas=1))
    eventually(lambda: get(api, "Deployment", namespace, "bp"))
    assert get(api, "PodDisruptionBudget", namespace, "bp") is None, "no PDB for one replica"

    scale_path = path_for(BP, "BlazenPeer", namespace, "bp", "scale")
    api.request(
        "PATCH", scale_path, body={"spec": {"replicas": 3}}, content_type="application/merge-patch+json"
    )
    assert get(api, "BlazenPeer", namespace, "bp")["spec"]["replicas"] == 3
    eventually(
        lambda: get(api, "Deployment", namespace, "bp")["spec"]["replicas"] == 3, what="deployment scaled"
    )
    eventually(lambda: get(api, "PodDisruptionBudget", namespace, "bp"), what="PDB created")

    def scale_status():
        scale = api.request("GET", scale_path)
        assert scale["status"]["replicas"] == 3
        return scale

    scale = eventually(scale_status, what="scale status")
    assert scale["status"]["selector"] == "app.kubernetes.io/instance=bp,app.kubernetes.io/name=blazen-peer"

    api.request(
        "PATCH", scale_path, body={"spec": {"replicas": 1}}, content_type="application/merge-patch+json"
    )
    eventually(lambda: get(api, "Deployment", namespace, "bp")["spec"]["replicas"] == 1)
    eventually(lambda: get(api, "PodDisruptionBudget", namespace, "bp") is None, what="PDB pruned")


def test_hpa_scales_through_the_scale_subresource(api, operator, namespace):
    # kube-controller-manager's HPA controller raises replicas to minReplicas before it needs any metric, so
    # this proves an HPA drives a BlazenPeer (scale subresource + status.selector) without a metrics server.
    create(api, manifest("bp", namespace, replicas=1))
    eventually(lambda: get(api, "Deployment", namespace, "bp"))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "bp", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": BP, "kind": "BlazenPeer", "name": "bp"},
            "minReplicas": 2,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
                }
            ],
        },
    }
    api.request("POST", f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers", body=hpa)
    eventually(
        lambda: get(api, "BlazenPeer", namespace, "bp")["spec"]["replicas"] == 2,
        timeout=90,
        what="the HPA scaled the BlazenPeer to minReplicas",
    )
    eventually(
        lambda: get(api, "Deployment", namespace, "bp")["spec"]["replicas"] == 2, what="deployment follows"
    )


def test_drift_is_reverted(api, operator, namespace):
    create(api, manifest("bp", namespace, replicas=2))
    eventually(lambda: get(api, "Service", namespace, "bp-peers") and get(api, "Deployment", namespace, "bp"))
    eventually(
        lambda: get(api, "BlazenPeer", namespace, "bp").get("status", {}).get("observedGeneration") == 1
    )

    # a manual edit of the Deployment (scale and image) is reverted
    patch = {
        "spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "peer", "image": "evil:1"}]}}}
    }
    api.request(
        "PATCH",
        path_for("apps/v1", "Deployment", namespace, "bp"),
        body=patch,
        content_type="application/strategic-merge-patch+json",
    )

    def reverted():
        d = get(api, "Deployment", namespace, "bp")
        assert d["spec"]["replicas"] == 2
        assert d["spec"]["template"]["spec"]["containers"][0]["image"] == SPEC["image"]
        return True

    eventually(reverted, what="deployment drift reverted")

    # a deleted child comes back
    old_uid = get(api, "Service", namespace, "bp-peers")["metadata"]["uid"]
    api.delete("v1", "Service", namespace, "bp-peers")
    eventually(
        lambda: (
            (get(api, "Service", namespace, "bp-peers") or {}).get("metadata", {}).get("uid")
            not in (None, old_uid)
        ),
        what="service recreated",
    )
    # an edited Service port is restored
    svc = get(api, "Service", namespace, "bp")
    ports = copy.deepcopy(svc["spec"]["ports"])
    ports[0]["port"] = 1234
    merge_patch(api, "Service", namespace, "bp", {"spec": {"ports": ports}}, api_version="v1")
    eventually(
        lambda: get(api, "Service", namespace, "bp")["spec"]["ports"][0]["port"] == 50051, what="port back"
    )


def test_a_pass_over_an_unchanged_blazenpeer_writes_nothing(api, operator, namespace, namespace_requests):
    """Passes keep running (child events, the resync every 3 s) but, once the BlazenPeer and its children
    have settled, none of them sends a write request."""
    create(api, manifest("bp", namespace, replicas=2))
    eventually(lambda: all(get(api, kind, namespace, name) for kind, name in CHILDREN), what="children")
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp").get("status", {}).get("replicas") == 2)
    namespace_requests.assert_passes_write_nothing("/blazenpeers/bp", window=3 * operator.resync_seconds + 1)


def test_a_new_blazenpeers_children_are_created_without_reading_them_first(
    api, operator, namespace, namespace_requests
):
    """The child watches have listed every child of ours: one they do not know does not exist, so it is
    created (by an apply that would fail if it existed) without a GET by name first, and so is a Secret stub
    whose Certificate does not exist yet (#16: 10 of the 44.6 requests per new BlazenPeer were those GETs)."""
    for kind in kinds.WATCHED_CHILDREN:  # the operator's watches have listed (in this process's registry)
        eventually(lambda k=kind: REGISTRY.get_sample_value(WATCH_LISTS, {"kind": k.kind}), what=kind.kind)
    create(api, manifest("bp", namespace, replicas=2))
    eventually(lambda: all(get(api, kind, namespace, name) for kind, name in CHILDREN), what="children")
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp").get("status", {}).get("replicas") == 2)
    # the BlazenPeer's own children (the namespace CA objects are the trust pass's, once per namespace)
    watched = {k.plural for k in kinds.WATCHED_CHILDREN}
    reads = [
        p
        for _, m, p in namespace_requests.calls
        if m == "GET" and p.split("/")[-2] in watched and p.split("/")[-1].startswith("bp")
    ]
    assert reads == []
    calls = [(m, p) for _, m, p in namespace_requests.calls]
    created = next(i for i, (m, p) in enumerate(calls) if m == "POST" and p.endswith("/secrets"))
    assert [p for m, p in calls[:created] if "/secrets/bp-" in p] == []  # the stubs: created unread


def test_rejected_child_is_reported_not_crash_looped(api, operator, namespace):
    bad_affinity = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    }
    create(api, manifest("bp", namespace, affinity=bad_affinity))

    def degraded():
        st = get(api, "BlazenPeer", namespace, "bp")["status"]
        c = cond({"status": st}, "Degraded")
        assert c["status"] == "True"
        assert c["reason"] == "ApplyFailed"
        assert "Deployment bp" in c["message"]
        return st

    st = eventually(degraded, what="ApplyFailed")
    assert st["phase"] == "Degraded"
    eventually(
        lambda: [e for e in events(api, namespace, "bp") if e["reason"] == "ApplyFailed"], what="event"
    )
    # fix the spec: the operator recovers
    merge_patch(api, "BlazenPeer", namespace, "bp", {"spec": {"affinity": None}})
    eventually(lambda: get(api, "Deployment", namespace, "bp"), what="deployment after fix")
    eventually(lambda: cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")["status"] == "False")


def test_delete_garbage_collects_everything_and_never_hangs(api, operator, namespace):
    create(api, manifest("bp", namespace, replicas=2))
    eventually(lambda: all(get(api, kind, namespace, name) for kind, name in CHILDREN), what="children")
    eventually(lambda: get(api, "Issuer", namespace, "blazen-ca"))

    started = time.monotonic()
    api.delete(BP, "BlazenPeer", namespace, "bp")
    eventually(lambda: get(api, "BlazenPeer", namespace, "bp") is None, timeout=5, what="BlazenPeer gone")
    assert time.monotonic() - started < 5, "no finalizer held the deletion"

    def all_gone():
        left = [(k, n) for k, n in CHILDREN if get(api, k, namespace, n) is not None]
        left += [
            (k, n)
            for k, n in [("Issuer", "blazen-ca"), ("Certificate", "blazen-ca")]
            if get(api, k, namespace, n)
        ]
        assert not left, left
        return True

    eventually(all_gone, timeout=60, what="garbage collection")


def test_namespace_ca_has_one_owner_and_goes_with_the_last_peer(api, operator, namespace):
    """Any number of BlazenPeers share the namespace CA through one owner, the trust ConfigMap: the objects
    do not grow per peer; deleting one peer of many leaves the CA; the last one takes it along."""
    for name in ("a", "b", "c"):
        create(api, manifest(name, namespace))
    eventually(lambda: all(get(api, "Deployment", namespace, n) for n in "abc"), what="peers reconciled")
    trust = eventually(lambda: get(api, "ConfigMap", namespace, "blazen-trust"), what="trust ConfigMap")
    owner = [("ConfigMap", "blazen-trust", trust["metadata"]["uid"])]
    for kind, name in [("Issuer", "blazen-ca"), ("Certificate", "blazen-ca"), ("Secret", "blazen-ca")]:
        meta = get(api, kind, namespace, name)["metadata"]
        assert [(r["kind"], r["name"], r["uid"]) for r in meta["ownerReferences"]] == owner
        managers = {m["manager"] for m in meta.get("managedFields") or []}
        assert not any(m.startswith("blazen-operator.") for m in managers), managers
    api.delete(BP, "BlazenPeer", namespace, "a")
    eventually(lambda: get(api, "Deployment", namespace, "a") is None, timeout=60, what="a collected")
    api.delete(BP, "BlazenPeer", namespace, "b")
    eventually(lambda: get(api, "Deployment", namespace, "b") is None, timeout=60, what="b collected")
    assert get(api, "Issuer", namespace, "blazen-ca") is not None, "c still uses the CA"
    assert get(api, "ConfigMap", namespace, "blazen-trust") is not None
    api.delete(BP, "BlazenPeer", namespace, "c")
    for kind in ("ConfigMap", "Issuer", "Certificate", "Secret"):
        name = "blazen-trust" if kind == "ConfigMap" else "blazen-ca"
        eventually(
            lambda kind=kind, name=name: get(api, kind, namespace, name) is None,
            timeout=60,
            what=f"{kind} gone",
        )


def test_per_peer_owner_references_of_earlier_versions_are_replaced(api, operator, namespace):
    """A namespace CA set up by an earlier operator (one ownerReference per BlazenPeer) is taken over: the
    trust ConfigMap becomes its only owner."""
    # a user issuer first, so the operator sets up no namespace CA before the legacy object exists
    user = {"issuerRef": {"name": "corp"}, "trustBundle": {"configMap": {"name": "roots"}}}
    a = create(api, manifest("a", namespace, replicas=0, tls=user))
    legacy = {"apiVersion": BP, "kind": "BlazenPeer", "name": "a", "uid": a["metadata"]["uid"]}
    api.request(
        "POST",
        path_for("cert-manager.io/v1", "Issuer", namespace),
        body={
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": {"name": "blazen-ca", "namespace": namespace, "ownerReferences": [legacy]},
            "spec": {"ca": {"secretName": "blazen-ca"}},
        },
    )
    to_namespace_ca = {"spec": {"tls": {"issuerRef": None, "trustBundle": None}}}
    merge_patch(api, "BlazenPeer", namespace, "a", to_namespace_ca)

    def one_owner():
        refs = get(api, "Issuer", namespace, "blazen-ca")["metadata"]["ownerReferences"]
        assert [r["kind"] for r in refs] == ["ConfigMap"], refs
        return True

    eventually(one_owner, timeout=60, what="legacy owners replaced")


def test_gpu_peer_lands_on_the_gpu_pool(api, operator, namespace):
    create(api, manifest("gpu", namespace, hardware={"gpu": 2}))
    dep = eventually(lambda: get(api, "Deployment", namespace, "gpu"))
    pod = dep["spec"]["template"]["spec"]
    # No pool label by default: the GPU request and the taint toleration place the pod on a plain cluster.
    assert "nodeSelector" not in pod
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_liveness_and_metrics(api, operator, operator_ports, namespace):
    create(api, manifest("bp", namespace))
    eventually(lambda: get(api, "Deployment", namespace, "bp"))
    with urllib.request.urlopen(f"http://127.0.0.1:{operator_ports['liveness']}/healthz", timeout=5) as resp:
        assert resp.status == 200
        assert "api" in json.loads(resp.read())
    with urllib.request.urlopen(f"http://127.0.0.1:{operator_ports['metrics']}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'blazen_operator_reconciles_total{result="ok"}' in text
    assert "blazen_operator_applies_total" in text


def test_network_policy_admits_the_operator_and_monitoring_to_the_admin_port(api, operator, namespace):
    create(api, manifest("bp", namespace))
    pol = eventually(lambda: get(api, "NetworkPolicy", namespace, "bp"), what="NetworkPolicy by default")
    admin = [r for r in pol["spec"]["ingress"] if r["ports"] == [{"port": 9090, "protocol": "TCP"}]]
    assert admin == [
        {
            "ports": [{"port": 9090, "protocol": "TCP"}],
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "blazen-system"}},
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/instance": "bo",
                            "app.kubernetes.io/name": "blazen-operator",
                        }
                    },
                },
                {"podSelector": {"matchLabels": {"blazen.dev/monitoring": "true"}}},
            ],
        }
    ]


def test_an_existing_object_with_a_childs_name_is_not_adopted(api, operator, namespace):
    """A Service named like the BlazenPeer's, created by someone else: the operator neither overwrites nor
    adopts it; the status names it. Once it is gone, the operator creates its own."""
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bp", "namespace": namespace, "labels": {"owner": "someone-else"}},
        "spec": {"ports": [{"name": "web", "port": 80, "targetPort": 8080}], "selector": {"app": "web"}},
    }
    before = api.request("POST", path_for("v1", "Service", namespace), body=theirs)
    create(api, manifest("bp", namespace))

    def degraded():
        c = cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")
        assert c["status"] == "True", c
        assert c["reason"] == "ChildNotOwned"
        return c

    c = eventually(degraded, what="Degraded ChildNotOwned")
    assert f"Service {namespace}/bp" in c["message"]
    eventually(lambda: [e for e in events(api, namespace, "bp") if e["reason"] == "ChildNotOwned"])
    time.sleep(4)  # more than a resync period: still untouched
    after = get(api, "Service", namespace, "bp")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert not after["metadata"].get("ownerReferences")
    assert after["spec"]["ports"] == before["spec"]["ports"]
    assert get(api, "Deployment", namespace, "bp") is None, "nothing applied while a child is foreign"

    api.delete("v1", "Service", namespace, "bp")

    def recovered():
        svc = get(api, "Service", namespace, "bp")
        assert svc is not None
        assert [r["kind"] for r in svc["metadata"]["ownerReferences"]] == ["BlazenPeer"]
        assert cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")["status"] == "False"
        return True

    eventually(recovered, timeout=30, what="the operator's own Service after the foreign one went")
    assert get(api, "Deployment", namespace, "bp") is not None


def test_a_foreign_tls_secret_is_not_adopted(api, operator, namespace):
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bp-client-tls", "namespace": namespace},
        "data": {"password": base64.b64encode(b"hunter2").decode()},
    }
    api.request("POST", path_for("v1", "Secret", namespace), body=secret)
    create(api, manifest("bp", namespace))

    def degraded():
        c = cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")
        assert c["reason"] == "ChildNotOwned", c
        return c

    assert f"Secret {namespace}/bp-client-tls" in eventually(degraded)["message"]
    live = get(api, "Secret", namespace, "bp-client-tls")
    assert not live["metadata"].get("ownerReferences")
    assert live["data"] == secret["data"]


def test_resync_namespace_patterns_select_as_kopf_does(api):
    """`--namespace` globs and negations in the resync loop's listing, against real namespaces."""
    tag = secrets.token_hex(3)
    names = [f"g{tag}-a", f"g{tag}-b", f"g{tag}-pr-1", f"h{tag}"]
    for ns in names:
        api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
    try:
        for ns in names:
            create(api, manifest("bp", ns))
        listed = lambda *patterns: {ns for ns, _ in list_peers(api, patterns)} & set(names)  # noqa: E731
        assert listed(f"g{tag}-*") == {f"g{tag}-a", f"g{tag}-b", f"g{tag}-pr-1"}
        assert listed(f"g{tag}-*,!*-pr-*") == {f"g{tag}-a", f"g{tag}-b"}
        assert listed(f"g{tag}-a", f"h{tag}") == {f"g{tag}-a", f"h{tag}"}
        assert listed(f"h{tag}", f"g{tag}-?") == {f"h{tag}", f"g{tag}-a", f"g{tag}-b"}
        assert listed() == set(names), "no pattern: every namespace"
    finally:
        for ns in names:
            api.request("DELETE", f"/api/v1/namespaces/{ns}")


@pytest.fixture
def peer_info_server() -> Iterator[int]:
    """/v1/info as a peer with one session ref would answer it; its port."""
    with json_http_server({"steps": ["examples::echo"], "session_refs": 1}) as port:
        yield port


def test_the_operator_uses_every_verb_the_chart_grants(
    api, operator, operator_calls, namespace, peer_info_server
):
    """The Helm RBAC grants exactly what the operator calls. Too little fails the whole suite (the operator
    runs under the chart's rules); too much fails here: one BlazenPeer is driven through every transition
    that makes the operator read, create, apply, prune and report, and every granted verb must have been used
    by the operator's client, except the ones only kopf uses (its watches and bookkeeping annotations), which
    kopf's own requirements decide, and finalizers/update, which the API server checks when an owner
    reference sets blockOwnerDeletion rather than being a call."""
    operator_calls.calls.clear()
    # The pods' /v1/info, answered by a real HTTP server on loopback: their session refs become the pods'
    # deletion-cost annotation (pods/patch).
    admin = peer_info_server
    create(
        api,
        manifest(
            "bp", namespace, replicas=2, auth={"tokenSecretRef": {"name": "tok"}}, ports={"admin": admin}
        ),
    )
    eventually(
        lambda: cond(get(api, "BlazenPeer", namespace, "bp"), "Degraded")["reason"] == "TokenSecretMissing"
    )
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": namespace}}
    secret["data"] = {"token": base64.b64encode(b"t").decode()}
    api.request("POST", path_for("v1", "Secret", namespace), body=secret)
    eventually(lambda: all(get(api, kind, namespace, name) for kind, name in CHILDREN), what="children")
    eventually(lambda: len(api.collect("v1", "Pod", namespace).items) == 2, what="two pods")
    _mark_pods_ready(
        api,
        namespace,
        ips={p["metadata"]["name"]: "127.0.0.1" for p in api.collect("v1", "Pod", namespace).items},
    )

    def cost_set():
        pods = api.collect("v1", "Pod", namespace).items
        assert all(
            (p["metadata"].get("annotations") or {}).get("controller.kubernetes.io/pod-deletion-cost") == "1"
            for p in pods
        ), pods
        return True

    eventually(cost_set, what="deletion costs from the pods' reports")

    # a stub Secret loses its peer label by hand: the operator puts it back (it re-reads the stubs, which it
    # never watches, once per resync period)
    unlabel = {"metadata": {"labels": {"blazen.dev/peer": None}}}
    merge_patch(api, "Secret", namespace, "bp-tls", unlabel, api_version="v1")
    eventually(
        lambda: get(api, "Secret", namespace, "bp-tls")["metadata"]["labels"].get("blazen.dev/peer") == "bp",
        timeout=30,
        what="the stub's label restored",
    )

    # everything a BlazenPeer can stop wanting, at once: the operator prunes each
    merge_patch(
        api,
        "BlazenPeer",
        namespace,
        "bp",
        {
            "spec": {
                "replicas": 1,
                "tls": {"enabled": False},
                "networkPolicy": {"enabled": False},
                "pod": {"serviceAccountName": "default"},
            }
        },
    )
    gone = [
        ("PodDisruptionBudget", "bp"),
        ("NetworkPolicy", "bp"),
        ("Certificate", "bp-tls"),
        ("Certificate", "bp-client-tls"),
        ("Secret", "bp-tls"),
        ("Secret", "bp-client-tls"),
        ("ServiceAccount", "bp-peer"),
        ("Role", "bp-peer"),
        ("RoleBinding", "bp-peer"),
    ]

    def pruned():
        left = [(k, n) for k, n in gone if get(api, k, namespace, n) is not None]
        assert not left, left
        return True

    eventually(pruned, timeout=60, what="children no longer desired are pruned")
    assert get(api, "Deployment", namespace, "bp") is not None
    assert get(api, "Secret", namespace, "tok") is not None, "the user's token Secret is never touched"
    # the last BlazenPeer on the namespace CA goes: the trust ConfigMap is deleted (the CA objects with it)
    api.delete(BP, "BlazenPeer", namespace, "bp")
    eventually(
        lambda: get(api, "ConfigMap", namespace, "blazen-trust") is None,
        timeout=60,
        what="the trust ConfigMap deleted with the last BlazenPeer",
    )

    # pruning reads the watch cache: the watches list and watch the watched kinds (kopf's the BlazenPeers and
    # BlazenFleets, the operator's own the child kinds, at startup: tests/api/test_child_watches.py)
    kopf_only = {(v, k.group, k.plural) for k in kinds.KINDS if k.watched for v in ("list", "watch")}
    kopf_only |= {("patch", "blazen.dev", "blazenpeers"), ("update", "blazen.dev", "blazenpeers/finalizers")}
    kopf_only |= {(v, k.group, k.plural) for k in kinds.KINDS if k.cluster_scoped for v in k.verbs}
    kopf_only.discard(("list", "blazen.dev", "blazenpeers"))  # the resync loop lists them itself
    kopf_only.discard(("list", "blazen.dev", "blazenfleets"))
    kopf_only |= {
        ("patch", "blazen.dev", "blazenfleets"),
        ("update", "blazen.dev", "blazenfleets/finalizers"),
    }
    # children are read by name only before the watches have listed them, or once a create found one of that
    # name that they do not know (test_an_existing_object_with_a_childs_name_is_not_adopted): not in this flow
    kopf_only |= {("get", k.group, k.plural) for k in kinds.WATCHED_CHILDREN}
    # held only to be granted to the fleet routers' Roles (RBAC escalation), never called
    kopf_only |= {(v, k.group, k.plural) for k in kinds.KINDS if k.grant_only for v in k.verbs}
    # a BlazenFleet's calls: tests/api/test_fleet_api.py drives a fleet through them
    kopf_only |= FLEET_VERBS
    kopf_only |= ROTATION_VERBS
    granted = {(v, g, r) for g, r, verbs in kinds.rbac_rules(cluster_scoped=False) for v in verbs}
    granted |= {(v, g, r) for g, r, verbs in kinds.rbac_rules(cluster_scoped=True) for v in verbs}
    assert operator_calls.calls <= granted, sorted(operator_calls.calls - granted)

    def all_used() -> bool:  # the resync loop's list comes within a period
        missing = granted - kopf_only - operator_calls.calls
        assert not missing, f"granted but never called: {sorted(missing)}"
        return True

    eventually(all_used, timeout=15, what="every granted verb used")
