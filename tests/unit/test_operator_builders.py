"""Table-driven tests of the pure builders: spec -> child manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator import cli
from blazen_operator.builders import Peer, certs, common, desired, workload
from blazen_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
BASE = {"image": "reg/peer:1", "entrypoint": "pkg.steps:register"}


def peer(token_digest: str | None = None, name: str = "bp", labels: dict | None = None, **spec: Any) -> Peer:
    return Peer(
        name=name,
        namespace="ns1",
        uid="uid-1",
        labels=labels or {},
        spec=parse_spec({**BASE, **spec}),
        token_digest=token_digest,
    )


def pod_spec(p: Peer) -> dict[str, Any]:
    return workload.deployment(p)["spec"]["template"]["spec"]


def container(p: Peer) -> dict[str, Any]:
    return pod_spec(p)["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# ------------------------------------------------------------ GPU pools

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("spec", "resources", "node_selector", "tolerations"),
    [
        pytest.param({}, {}, None, None, id="cpu-only: no gpu, no pool, no toleration"),
        pytest.param(
            {"hardware": {"gpu": 2}},
            {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}},
            {"nvidia.com/gpu.present": "true"},
            [GPU_TOLERATION],
            id="gpu: resource, default pool, toleration",
        ),
        pytest.param(
            {"hardware": {"gpu": 1, "gpuResourceName": "amd.com/gpu", "poolSelector": {"pool": "mi300"}}},
            {"requests": {"amd.com/gpu": 1}, "limits": {"amd.com/gpu": 1}},
            {"pool": "mi300"},
            [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            id="gpu: custom resource name and pool",
        ),
        pytest.param(
            {"hardware": {"gpu": 1, "poolSelector": {}, "tolerateGpuTaint": False}},
            {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 1}},
            None,
            None,
            id="gpu: pool and toleration switched off",
        ),
        pytest.param(
            {
                "hardware": {"gpu": 1},
                "nodeSelector": {"nvidia.com/gpu.present": "false", "zone": "a"},
                "tolerations": [{"key": "spot", "operator": "Exists"}],
                "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
            },
            {
                "requests": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1},
                "limits": {"memory": "8Gi", "nvidia.com/gpu": 1},
            },
            {"nvidia.com/gpu.present": "false", "zone": "a"},
            [GPU_TOLERATION, {"key": "spot", "operator": "Exists"}],
            id="gpu: overrides win and merge",
        ),
        pytest.param(
            {
                "tolerations": [
                    {"key": "dedicated", "operator": "Equal", "value": "blazen", "effect": "NoSchedule"}
                ]
            },
            {},
            None,
            [{"key": "dedicated", "operator": "Equal", "value": "blazen", "effect": "NoSchedule"}],
            id="cpu-only: user toleration only",
        ),
    ],
)
def test_gpu_pools(spec, resources, node_selector, tolerations):
    p = peer(**spec)
    assert container(p)["resources"] == resources
    assert pod_spec(p).get("nodeSelector") == node_selector
    assert pod_spec(p).get("tolerations") == tolerations


def test_gpu_rollout_does_not_need_a_spare_gpu():
    assert workload.deployment(peer(hardware={"gpu": 1}))["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0,
        "maxUnavailable": 1,
    }
    assert workload.deployment(peer())["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ------------------------------------------------------------ container


@pytest.mark.parametrize(
    ("spec", "present", "absent"),
    [
        (
            {},
            {
                "--entrypoint": "pkg.steps:register",
                "--grpc-addr": "0.0.0.0:50051",
                "--admin-addr": "0.0.0.0:9090",
                "--http-addr": "0.0.0.0:8080",
                "--forward-dns": "bp-peers.ns1.svc",
                "--tls-cert": "/etc/blazen/tls/tls.crt",
                "--tls-key": "/etc/blazen/tls/tls.key",
                "--tls-ca": "/etc/blazen/tls/ca.crt",
            },
            ["--steps", "--token-file", "--plaintext-grpc-addr", "--insecure"],
        ),
        (
            {"steps": ["a::x", "b::y"], "http": {"enabled": False}},
            {"--steps": "a::x,b::y"},
            ["--http-addr", "--cors-allow-origin"],
        ),
        (
            {
                "tls": {"enabled": False},
                "auth": {"tokenSecretRef": {"name": "tok"}},
                "plaintextGrpc": {"enabled": True, "allowedFrom": [{"podSelector": {}}]},
                "ports": {"grpc": 7000, "plaintextGrpc": 7001},
            },
            {
                "--token-file": "/etc/blazen/token/token",
                "--plaintext-grpc-addr": "0.0.0.0:7001",
                "--grpc-addr": "0.0.0.0:7000",
            },
            ["--tls-cert", "--tls-key", "--tls-ca"],
        ),
    ],
)
def test_peer_args(spec, present, absent):
    c = container(peer(**spec))
    assert c["command"] == ["blazen-peer"]
    assert c["args"][0] == "serve"
    for name, value in present.items():
        assert flag(c["args"], name) == value, name
    for name in absent:
        assert name not in c["args"]


def test_cors_origins_repeat_the_flag():
    args = container(peer(http={"corsOrigins": ["https://a", "https://b"]}))["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--cors-allow-origin"] == [
        "https://a",
        "https://b",
    ]


def test_node_id_is_pod_name_and_cannot_be_overridden():
    env = container(peer(env=[{"name": "BLAZEN_PEER_NODE_ID", "value": "x"}, {"name": "A", "value": "1"}]))[
        "env"
    ]
    assert env[0] == {
        "name": "BLAZEN_PEER_NODE_ID",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
    }
    assert [e["name"] for e in env] == ["BLAZEN_PEER_NODE_ID", "A"]


def test_hardening_probes_and_mounts():
    p = peer(auth={"tokenSecretRef": {"name": "tok", "key": "t"}})
    ps, c = pod_spec(p), container(p)
    assert ps["automountServiceAccountToken"] is False
    assert ps["securityContext"]["runAsNonRoot"] is True
    assert ps["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin", "scheme": "HTTP"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/tmp", "/etc/blazen/tls", "/etc/blazen/token"}
    assert all("subPath" not in m for m in c["volumeMounts"]), "subPath mounts never see rotated secrets"
    vols = {v["name"]: v for v in ps["volumes"]}
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert vols["tls"]["secret"]["secretName"] == "bp-tls"
    assert vols["token"]["secret"]["secretName"] == "tok"
    assert vols["token"]["secret"]["items"] == [{"key": "t", "path": "token"}]


def test_pod_escape_hatch():
    p = peer(
        pod={
            "imagePullSecrets": [{"name": "regcred"}],
            "serviceAccountName": "custom",
            "annotations": {"a": "1"},
            "labels": {"team": "ml", "app.kubernetes.io/instance": "hijack"},
            "priorityClassName": "high",
        },
        affinity={"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    )
    tmpl = workload.deployment(p)["spec"]["template"]
    assert tmpl["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert tmpl["spec"]["serviceAccountName"] == "custom"
    assert tmpl["spec"]["priorityClassName"] == "high"
    assert tmpl["spec"]["affinity"] == {
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}
    }
    assert tmpl["metadata"]["annotations"]["a"] == "1"
    assert tmpl["metadata"]["labels"]["team"] == "ml"
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/instance"] == "bp", (
        "selector labels cannot be hijacked"
    )
    assert workload.rbac(p) == [], "a user-provided ServiceAccount replaces ours"


# ------------------------------------------------------------ rolling


@pytest.mark.parametrize(
    "change",
    [
        {"image": "reg/peer:2"},
        {"entrypoint": "other.steps"},
        {"steps": ["a::b"]},
        {"env": [{"name": "X", "value": "1"}]},
        {"hardware": {"gpu": 1}},
        {"resources": {"requests": {"cpu": "1"}}},
        {"http": {"corsOrigins": ["https://x"]}},
        {"tls": {"enabled": False}, "auth": {"tokenSecretRef": {"name": "t"}}},
        {"pod": {"annotations": {"x": "y"}}},
    ],
)
def test_pod_affecting_changes_change_the_template_hash(change):
    before = workload.deployment(peer())["spec"]["template"]
    after = workload.deployment(peer(**change))["spec"]["template"]
    key = common.CONFIG_HASH_ANNOTATION
    assert before["metadata"]["annotations"][key] != after["metadata"]["annotations"][key]


def test_replicas_do_not_change_the_template():
    a = workload.deployment(peer(replicas=1))["spec"]["template"]
    b = workload.deployment(peer(replicas=5))["spec"]["template"]
    assert a == b


def test_token_secret_change_rolls_the_pods():
    spec = {"auth": {"tokenSecretRef": {"name": "tok"}}}
    a = workload.deployment(peer(token_digest=common.secret_data_digest({"token": "b2xk"}), **spec))
    b = workload.deployment(peer(token_digest=common.secret_data_digest({"token": "bmV3"}), **spec))
    assert a["spec"]["template"] != b["spec"]["template"]


def test_builders_are_deterministic():
    assert json.dumps([c.manifest for c in desired(peer())]) == json.dumps(
        [c.manifest for c in desired(peer())]
    )


# ------------------------------------------------------------ children


def kinds(p: Peer) -> list[tuple[str, str]]:
    return [(c.manifest["kind"], c.manifest["metadata"]["name"]) for c in desired(p)]


@pytest.mark.parametrize(
    ("spec", "expected", "unexpected"),
    [
        (
            {},
            [
                ("ServiceAccount", "bp-peer"),
                ("Role", "bp-peer"),
                ("RoleBinding", "bp-peer"),
                ("Issuer", "blazen-selfsigned"),
                ("Certificate", "blazen-ca"),
                ("Issuer", "blazen-ca"),
                ("Certificate", "bp-tls"),
                ("Certificate", "bp-client-tls"),
                ("Secret", "bp-tls"),
                ("Secret", "bp-client-tls"),
                ("Service", "bp"),
                ("Service", "bp-peers"),
                ("Deployment", "bp"),
            ],
            [("PodDisruptionBudget", "bp"), ("NetworkPolicy", "bp")],
        ),
        (
            {"replicas": 3, "tls": {"issuerRef": {"name": "corp", "kind": "ClusterIssuer"}}},
            [("PodDisruptionBudget", "bp"), ("Certificate", "bp-tls")],
            [("Issuer", "blazen-selfsigned"), ("Certificate", "blazen-ca"), ("NetworkPolicy", "bp")],
        ),
        (
            {"replicas": 3, "disruptionBudget": {"enabled": False}, "networkPolicy": {"enabled": True}},
            [("NetworkPolicy", "bp")],
            [("PodDisruptionBudget", "bp")],
        ),
        (
            {"tls": {"enabled": False}, "auth": {"tokenSecretRef": {"name": "t"}}},
            [("Deployment", "bp")],
            [("Certificate", "bp-tls"), ("Secret", "bp-tls"), ("Issuer", "blazen-ca")],
        ),
    ],
)
def test_children_set(spec, expected, unexpected):
    got = kinds(peer(**spec))
    for item in expected:
        assert item in got
    for item in unexpected:
        assert item not in got


def test_every_child_is_owned_and_labelled():
    p = peer(replicas=2, networkPolicy={"enabled": True}, labels={"team": "ml", "kopf.zalando.org/x": "y"})
    for child in desired(p):
        meta = child.manifest["metadata"]
        (ref,) = meta["ownerReferences"]
        assert ref["kind"] == "BlazenPeer"
        assert ref["apiVersion"] == "blazen.dev/v1alpha1"
        assert ref["uid"] == "uid-1"
        assert ref["controller"] is (not child.shared), "shared namespace-CA objects have several owners"
        assert meta["namespace"] == "ns1"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "blazen-operator"
        if not child.shared:
            assert meta["labels"][common.PEER_LABEL] == "bp"
            assert meta["labels"]["team"] == "ml"
            assert "kopf.zalando.org/x" not in meta["labels"]
        else:
            assert common.PEER_LABEL not in meta["labels"]


def test_services():
    p = peer(plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {}}]})
    svc = workload.service(p)
    assert [x["name"] for x in svc["spec"]["ports"]] == ["grpc", "http", "grpc-plain"]
    assert svc["spec"]["ports"][2]["port"] == 50052
    headless = workload.headless_service(p)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["spec"]["selector"] == svc["spec"]["selector"] == common.selector_labels(p)


def test_certificates_cover_both_services_with_server_and_client_usages():
    p = peer()
    server = certs.server_certificate(p)
    for name in ("bp", "bp.ns1.svc", "bp-peers", "bp-peers.ns1.svc", "*.bp-peers.ns1.svc"):
        assert name in server["spec"]["dnsNames"]
    assert {"server auth", "client auth"} <= set(server["spec"]["usages"])
    assert server["spec"]["secretName"] == "bp-tls"
    assert server["spec"]["issuerRef"] == {"name": "blazen-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert server["spec"]["duration"] == "2160h"
    client = certs.client_certificate(p)
    assert client["spec"]["secretName"] == "bp-client-tls"
    assert "client auth" in client["spec"]["usages"]
    assert "server auth" not in client["spec"]["usages"]
    ca = {(m["kind"], m["metadata"]["name"]): m for m in certs.namespace_ca(p)}
    assert ca[("Issuer", "blazen-selfsigned")]["spec"] == {"selfSigned": {}}
    assert ca[("Certificate", "blazen-ca")]["spec"]["isCA"] is True
    assert ca[("Issuer", "blazen-ca")]["spec"] == {"ca": {"secretName": "blazen-ca"}}


def test_custom_issuer():
    p = peer(
        tls={"issuerRef": {"name": "corp", "kind": "ClusterIssuer"}, "duration": "24h", "renewBefore": "8h"}
    )
    spec = certs.server_certificate(p)["spec"]
    assert spec["issuerRef"] == {"name": "corp", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert (spec["duration"], spec["renewBefore"]) == ("24h", "8h")


def test_secret_stubs_are_create_only():
    stubs = [c for c in desired(peer()) if c.manifest["kind"] == "Secret"]
    assert stubs
    assert all(c.create_only for c in stubs)
    assert all(c.manifest["type"] == "kubernetes.io/tls" for c in stubs)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ({}, {"maxUnavailable": 1}),
        ({"minAvailable": "50%"}, {"minAvailable": "50%"}),
        ({"maxUnavailable": 2}, {"maxUnavailable": 2}),
    ],
)
def test_pdb(budget, expected):
    pdb = workload.pod_disruption_budget(peer(replicas=4, disruptionBudget=budget))
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == expected
    assert workload.pod_disruption_budget(peer(replicas=1, disruptionBudget=budget)) is None


def test_network_policy_fences_the_plaintext_port():
    only_ns = {"namespaceSelector": {"matchLabels": {"team": "ml"}}}
    p = peer(plaintextGrpc={"enabled": True, "allowedFrom": [only_ns]})
    np = workload.network_policy(p)
    rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
    assert rules[50052]["from"] == [only_ns]
    assert "from" not in rules[50051], "TLS ports stay open when networkPolicy.allowedFrom is empty"
    assert np["spec"]["policyTypes"] == ["Ingress"]

    p = peer(networkPolicy={"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"c": "1"}}}]})
    rules = {r["ports"][0]["port"]: r for r in workload.network_policy(p)["spec"]["ingress"]}
    assert {"podSelector": {"matchLabels": common.selector_labels(p)}} in rules[50051]["from"], (
        "siblings forward"
    )
    assert 50052 not in rules


# ------------------------------------------------------------ render CLI


def test_render_cli_uses_the_builders(tmp_path, capsys):
    manifest = tmp_path / "bp.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "blazen.dev/v1alpha1",
                "kind": "BlazenPeer",
                "metadata": {"name": "bp"},
                "spec": BASE,
            }
        )
    )
    assert cli.main(["render", "-f", str(manifest), "-n", "ns1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    expected = [c.manifest for c in desired(Peer(name="bp", namespace="ns1", spec=parse_spec(BASE)))]
    assert docs == expected


def test_render_cli_reports_invalid_specs(tmp_path, capsys):
    manifest = tmp_path / "bp.yaml"
    manifest.write_text(
        yaml.safe_dump({"kind": "BlazenPeer", "metadata": {"name": "bp"}, "spec": {"image": "x"}})
    )
    assert cli.main(["render", "-f", str(manifest)]) == 2
    assert "entrypoint" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_render_examples(path, capsys):
    assert cli.main(["render", "-f", str(path)]) == 0
    assert any(d["kind"] == "Deployment" for d in yaml.safe_load_all(capsys.readouterr().out))
