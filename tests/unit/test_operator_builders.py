"""Table-driven tests of the pure builders: spec -> child manifests."""

from __future__ import annotations

import functools
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


def peer(name: str = "bp", labels: dict | None = None, **spec: Any) -> Peer:
    return Peer(
        name=name, namespace="ns1", uid="uid-1", labels=labels or {}, spec=parse_spec({**BASE, **spec})
    )


def pod_spec(p: Peer) -> dict[str, Any]:
    return workload.deployment(p)["spec"]["template"]["spec"]


def container(p: Peer) -> dict[str, Any]:
    return pod_spec(p)["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# ------------------------------------------------------------ GPU pools

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_DEFAULT_REQUESTS = {"cpu": 1, "memory": "4Gi"}


@pytest.mark.parametrize(
    ("spec", "resources", "node_selector", "tolerations"),
    [
        pytest.param({}, {}, None, None, id="cpu-only: no gpu, no pool, no toleration"),
        pytest.param(
            {"hardware": {"gpu": 2}},
            {
                "requests": {"cpu": 2, "memory": "8Gi", "nvidia.com/gpu": 2},
                "limits": {"nvidia.com/gpu": 2},
            },
            None,
            [GPU_TOLERATION],
            id="gpu: resource, Burstable requests, toleration, no pool label (plain clusters)",
        ),
        pytest.param(
            {"hardware": {"gpu": 1, "gpuResourceName": "amd.com/gpu", "poolSelector": {"pool": "mi300"}}},
            {"requests": {"amd.com/gpu": 1, **GPU_DEFAULT_REQUESTS}, "limits": {"amd.com/gpu": 1}},
            {"pool": "mi300"},
            [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            id="gpu: custom resource name and pool",
        ),
        pytest.param(
            {"hardware": {"gpu": 1, "poolSelector": {}, "tolerateGpuTaint": False}},
            {"requests": {"nvidia.com/gpu": 1, **GPU_DEFAULT_REQUESTS}, "limits": {"nvidia.com/gpu": 1}},
            None,
            None,
            id="gpu: toleration switched off",
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


@pytest.mark.parametrize(
    ("spec", "rolling"),
    [
        pytest.param({}, {"maxSurge": 1, "maxUnavailable": 0}, id="default keeps capacity"),
        pytest.param(
            {"hardware": {"gpu": 1}}, {"maxSurge": 1, "maxUnavailable": 0}, id="gpu default: surge too"
        ),
        pytest.param(
            {"replicas": 4, "rollout": {"maxSurge": 2}}, {"maxSurge": 2, "maxUnavailable": 0}, id="surge 2"
        ),
        pytest.param(
            {"hardware": {"gpu": 1}, "rollout": {"strategy": "Recreate"}},
            {"maxSurge": 0, "maxUnavailable": 1},
            id="gpu without a spare: recreate one at a time",
        ),
    ],
)
def test_rollout_strategy(spec, rolling):
    dep = workload.deployment(peer(**spec))["spec"]
    assert dep["strategy"] == {"type": "RollingUpdate", "rollingUpdate": rolling}


def test_progress_deadline_covers_the_startup_budget():
    assert workload.deployment(peer())["spec"]["progressDeadlineSeconds"] == 600
    slow = peer(probes={"startupBudgetSeconds": 1800})
    assert workload.deployment(slow)["spec"]["progressDeadlineSeconds"] == 2100
    assert container(slow)["startupProbe"]["failureThreshold"] * 2 == 1800
    # The admin port is up during the entrypoint's import (/healthz 200): only /readyz ends the start.
    assert container(slow)["startupProbe"]["httpGet"]["path"] == "/readyz"


# ------------------------------------------------------------ GPU-ready pod shape


def mounts(p: Peer) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in container(p)["volumeMounts"]}


def volumes(p: Peer) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(p)["volumes"]}


def test_writable_home_and_scratch_under_the_read_only_root():
    p = peer()
    assert container(p)["securityContext"]["readOnlyRootFilesystem"] is True
    assert mounts(p)["/tmp"]["name"] == "tmp"
    assert mounts(p)["/home/blazen"]["name"] == "home"
    assert volumes(p)["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}
    assert volumes(p)["home"] == {"name": "home", "emptyDir": {"sizeLimit": "4Gi"}}
    env = {e["name"]: e.get("value") for e in container(p)["env"]}
    assert env["HOME"] == "/home/blazen"
    assert env["XDG_CACHE_HOME"] == "/home/blazen/.cache"
    bigger = peer(scratchSizeLimit="50Gi", env=[{"name": "HOME", "value": "/data"}])
    assert volumes(bigger)["home"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert [e for e in container(bigger)["env"] if e["name"] == "HOME"] == [
        {"name": "HOME", "value": "/data"}
    ]


def test_dev_shm_is_memory_backed_for_gpu_peers():
    assert "dshm" not in volumes(peer())
    gpu = peer(hardware={"gpu": 1})
    assert volumes(gpu)["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}
    assert mounts(gpu)["/dev/shm"]["name"] == "dshm"
    assert volumes(peer(shmSize="256Mi"))["dshm"]["emptyDir"]["sizeLimit"] == "256Mi"


def test_model_volume_and_mount():
    p = peer(
        hardware={"gpu": 1},
        volumes=[
            {"name": "weights", "persistentVolumeClaim": {"claimName": "llama", "readOnly": True}},
            {"name": "cfg", "configMap": {"name": "model-cfg"}},
        ],
        volumeMounts=[
            {"name": "weights", "mountPath": "/models"},
            {
                "name": "cfg",
                "mountPath": "/etc/model/config.json",
                "subPath": "config.json",
                "readOnly": False,
            },
        ],
    )
    assert volumes(p)["weights"] == {
        "name": "weights",
        "persistentVolumeClaim": {"claimName": "llama", "readOnly": True},
    }
    assert volumes(p)["cfg"] == {"name": "cfg", "configMap": {"name": "model-cfg"}}
    assert mounts(p)["/models"] == {"name": "weights", "mountPath": "/models", "readOnly": True}
    assert mounts(p)["/etc/model/config.json"] == {
        "name": "cfg",
        "mountPath": "/etc/model/config.json",
        "readOnly": False,
        "subPath": "config.json",
    }


def test_runtime_class_probes_and_spread():
    p = peer(
        replicas=3,
        pod={"runtimeClassName": "nvidia"},
        probes={"livenessPeriodSeconds": 30, "readinessFailureThreshold": 5, "timeoutSeconds": 4},
    )
    ps = pod_spec(p)
    assert ps["runtimeClassName"] == "nvidia"
    assert container(p)["livenessProbe"]["periodSeconds"] == 30
    assert container(p)["readinessProbe"]["failureThreshold"] == 5
    assert {
        container(p)[k]["timeoutSeconds"] for k in ("startupProbe", "livenessProbe", "readinessProbe")
    } == {4}
    spread = ps["topologySpreadConstraints"]
    assert [s["topologyKey"] for s in spread] == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    assert all(s["whenUnsatisfiable"] == "ScheduleAnyway" and s["maxSkew"] == 1 for s in spread)
    assert all(s["matchLabelKeys"] == ["pod-template-hash"] for s in spread)
    assert spread[0]["labelSelector"] == {"matchLabels": common.selector_labels(p)}
    assert pod_spec(peer())["topologySpreadConstraints"] == spread  # scaling must not roll the pods
    assert "topologySpreadConstraints" not in pod_spec(peer(replicas=3, topologySpreadConstraints=[]))
    assert "runtimeClassName" not in pod_spec(peer())


# ------------------------------------------------------------ shutdown


@pytest.mark.parametrize(
    ("pod", "grace", "admit", "age"),
    [
        ({}, "29", "10", "5"),
        ({"terminationGracePeriodSeconds": 120, "drainAdmitSeconds": 15}, "119", "15", "7.5"),
        ({"terminationGracePeriodSeconds": 5, "drainAdmitSeconds": 0}, "4", "0", None),
    ],
)
def test_one_field_sets_the_pod_grace_and_the_runtime_drain(pod, grace, admit, age):
    p = peer(pod=pod)
    args = container(p)["args"]
    assert pod_spec(p)["terminationGracePeriodSeconds"] == int(grace) + 1
    assert flag(args, "--shutdown-grace-secs") == grace
    assert flag(args, "--shutdown-admit-secs") == admit
    assert flag(args, "--grpc-max-connection-age-secs") == age


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
                "--http-auth": "auto",
                "--forward-dns": "bp-peers.ns1.svc",
                "--tls-cert": "/etc/blazen/tls/tls.crt",
                "--tls-key": "/etc/blazen/tls/tls.key",
                "--tls-ca": "/etc/blazen/trust/ca.crt",
            },
            ["--steps", "--token-file", "--plaintext-grpc-addr", "--insecure"],
        ),
        (
            {"steps": ["a::x", "b::y"], "http": {"enabled": False}},
            {"--steps": "a::x,b::y"},
            ["--http-addr", "--http-auth", "--cors-allow-origin"],
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


@pytest.mark.parametrize(
    ("auth", "flag_value"),
    [
        ("ClientCertificate", "client-cert"),
        ("Token", "token"),
        ("Unauthenticated", "unauthenticated"),
    ],
)
def test_http_auth_is_passed_explicitly(auth, flag_value):
    p = peer(http={"auth": auth}, auth={"tokenSecretRef": {"name": "tok"}})
    assert flag(container(p)["args"], "--http-auth") == flag_value


def test_cors_origins_repeat_the_flag():
    args = container(peer(http={"corsOrigins": ["https://a", "https://b"], "auth": "Token"}))["args"]
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
    assert [e["name"] for e in env] == ["BLAZEN_PEER_NODE_ID", "HOME", "XDG_CACHE_HOME", "A"]


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
    assert set(mounts) == {
        "/tmp",
        "/home/blazen",
        "/etc/blazen/tls",
        "/etc/blazen/trust",
        "/etc/blazen/token",
    }
    assert all("subPath" not in m for m in c["volumeMounts"]), "subPath mounts never see rotated secrets"
    vols = {v["name"]: v for v in ps["volumes"]}
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}
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


def test_token_is_a_mounted_directory_and_no_digest_of_it_is_in_the_template():
    """A rotated token reaches the pods through the volume (the runtime re-reads the file): the template
    depends on the Secret's name and key only, so a rotation does not roll the pods."""
    p = peer(auth={"tokenSecretRef": {"name": "tok"}})
    template = workload.deployment(p)["spec"]["template"]
    assert set(template["metadata"]["annotations"]) == {common.CONFIG_HASH_ANNOTATION}
    assert mounts(p)["/etc/blazen/token"] == {
        "name": "token",
        "mountPath": "/etc/blazen/token",
        "readOnly": True,
    }
    assert "subPath" not in mounts(p)["/etc/blazen/token"]


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
                ("Certificate", "bp-tls"),
                ("Certificate", "bp-client-tls"),
                ("Secret", "bp-tls"),
                ("Secret", "bp-client-tls"),
                ("Service", "bp"),
                ("Service", "bp-peers"),
                ("Deployment", "bp"),
            ],
            # the namespace CA is not a child of any BlazenPeer (trust.py keeps it)
            [("PodDisruptionBudget", "bp"), ("Issuer", "blazen-ca"), ("Certificate", "blazen-ca")],
        ),
        (
            {"replicas": 3, "tls": {"issuerRef": {"name": "corp", "kind": "ClusterIssuer"}}},
            [("PodDisruptionBudget", "bp"), ("Certificate", "bp-tls"), ("NetworkPolicy", "bp")],
            [("Issuer", "blazen-selfsigned"), ("Certificate", "blazen-ca")],
        ),
        (
            {"replicas": 3, "disruptionBudget": {"enabled": False}, "networkPolicy": {"enabled": False}},
            [("Deployment", "bp")],
            [("PodDisruptionBudget", "bp"), ("NetworkPolicy", "bp")],
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
        assert ref["controller"] is True
        assert meta["namespace"] == "ns1"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "blazen-operator"
        assert meta["labels"][common.PEER_LABEL] == "bp"
        assert meta["labels"]["team"] == "ml"
        assert "kopf.zalando.org/x" not in meta["labels"]


def test_services():
    p = peer(plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {}}]})
    svc = workload.service(p)
    assert [x["name"] for x in svc["spec"]["ports"]] == ["grpc", "http", "grpc-plain"]
    assert svc["spec"]["ports"][2]["port"] == 50052
    headless = workload.headless_service(p)
    assert headless["spec"]["clusterIP"] == "None"
    # terminating pods stay listed: siblings forward deref/release to the pod holding the ref until it is gone
    assert headless["spec"]["publishNotReadyAddresses"] is True
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


OPERATOR = common.OperatorIdentity(
    namespace="blazen-system",
    pod_labels=(("app.kubernetes.io/instance", "bo"), ("app.kubernetes.io/name", "blazen-operator")),
)


def admin_rules(p: Peer) -> list[dict[str, Any]]:
    np = workload.network_policy(p)
    assert np is not None
    return [r for r in np["spec"]["ingress"] if r["ports"] == [{"port": 9090, "protocol": "TCP"}]]


def test_network_policy_is_on_by_default_and_fences_the_admin_port():
    p = Peer(name="bp", namespace="ns1", uid="u", spec=parse_spec(BASE), operator=OPERATOR)
    ingress = workload.network_policy(p)["spec"]["ingress"]
    (admin,) = admin_rules(p)
    assert admin["from"] == [
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
    ]
    # every rule that admits the admin port names who may use it (no rule without `from` covers 9090)
    for rule in ingress:
        ports = [x["port"] for x in rule["ports"]]
        assert 9090 not in ports or rule.get("from"), rule


def test_admin_port_with_nobody_to_admit_has_no_rule_at_all():
    # An ingress rule without `from` admits everyone: with no operator identity and an empty knob the admin
    # port must get no rule, not an open one.
    p = peer(networkPolicy={"adminAllowedFrom": []})
    assert admin_rules(p) == []
    p = Peer(
        name="bp",
        namespace="ns1",
        uid="u",
        spec=parse_spec({**BASE, "networkPolicy": {"adminAllowedFrom": []}}),
        operator=OPERATOR,
    )
    (admin,) = admin_rules(p)
    assert admin["from"] == [OPERATOR.network_peer()]


def test_disabled_network_policy_with_plaintext_fences_only_the_plaintext_port():
    p = peer(
        networkPolicy={"enabled": False},
        plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {}}]},
    )
    rules = {r["ports"][0]["port"]: r for r in workload.network_policy(p)["spec"]["ingress"]}
    assert "from" not in rules[9090]
    assert rules[50052]["from"] == [{"podSelector": {}}]


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


def test_render_cli_admits_the_named_operator_pods_to_the_admin_port(tmp_path, capsys):
    manifest = tmp_path / "bp.yaml"
    manifest.write_text(yaml.safe_dump({"kind": "BlazenPeer", "metadata": {"name": "bp"}, "spec": BASE}))
    args = ["render", "-f", str(manifest), "--operator-namespace", "ops"]
    assert cli.main([*args, "--operator-pod-labels", "b=2,a=1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    (pol,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    admin = [r for r in pol["spec"]["ingress"] if r["ports"][0]["port"] == 9090]
    assert admin[0]["from"][0] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
        "podSelector": {"matchLabels": {"a": "1", "b": "2"}},
    }
    with pytest.raises(SystemExit):
        cli.main([*args, "--operator-pod-labels", "no-equals-sign"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_run_cli_no_longer_takes_standalone(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--standalone", "--all-namespaces"])
    assert "--standalone" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    ("bundle", "volume"),
    [
        (
            {"configMap": {"name": "roots"}},
            {"name": "trust", "configMap": {"name": "roots", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ),
        (
            {"secret": {"name": "acme-roots", "key": "bundle.pem"}},
            {
                "name": "trust",
                "secret": {"secretName": "acme-roots", "items": [{"key": "bundle.pem", "path": "ca.crt"}]},
            },
        ),
    ],
)
def test_trust_bundle_replaces_the_issuer_ca(bundle, volume):
    """Issuers that write no ca.crt (ACME): the CA bundle comes from a ConfigMap or Secret key instead."""
    p = peer(tls={"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}, "trustBundle": bundle})
    assert flag(container(p)["args"], "--tls-ca") == "/etc/blazen/trust/ca.crt"
    assert volumes(p)["trust"] == volume
    assert mounts(p)["/etc/blazen/trust"] == {
        "name": "trust",
        "mountPath": "/etc/blazen/trust",
        "readOnly": True,
    }


def test_user_issuer_peers_trust_the_bundle_the_operator_keeps_for_that_issuer():
    """Without tls.trustBundle, a user issuer's pods read the ConfigMap the operator fills from its leaves'
    ca.crt (old + new CA while the issuer's CA changes), optional: an ACME issuer writes no ca.crt and the
    pods start without one. Until that bundle holds a CA, the leaf's own ca.crt stands in (the runtime takes
    the first CA file that holds one), so a new peer's first pods never start without their issuer's CA."""
    corp = peer(tls={"issuerRef": {"name": "corp"}})
    assert flag(container(corp)["args"], "--tls-ca") == "/etc/blazen/trust/ca.crt,/etc/blazen/tls/ca.crt"
    assert volumes(corp)["trust"] == {
        "name": "trust",
        "configMap": {
            "name": "blazen-trust-issuer-corp",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
            "optional": True,
        },
    }
    acme = peer(tls={"issuerRef": {"name": "le", "kind": "ClusterIssuer", "group": "acme.example.com"}})
    name = volumes(acme)["trust"]["configMap"]["name"]
    assert name.startswith("blazen-trust-clusterissuer-le-"), "another group: the name says so"
    long = peer(tls={"issuerRef": {"name": "x" * 253}})
    assert len(volumes(long)["trust"]["configMap"]["name"]) <= 253


def test_namespace_ca_peers_trust_the_namespace_bundle():
    """The pods read the trust ConfigMap the operator maintains (old + new roots during a rotation), not the
    leaf Secret's ca.crt, which holds only the CA that signed that leaf."""
    p = peer()
    assert flag(container(p)["args"], "--tls-ca") == "/etc/blazen/trust/ca.crt"
    assert volumes(p)["trust"] == {
        "name": "trust",
        "configMap": {"name": "blazen-trust", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
    }
    assert "subPath" not in mounts(p)["/etc/blazen/trust"]


@pytest.mark.parametrize(
    ("tls", "mode", "ca"),
    [
        ({}, "require", "/etc/blazen/trust/ca.crt"),  # the namespace CA: its trust bundle is always there
        (
            {
                "issuerRef": {"name": "corp", "kind": "ClusterIssuer"},
                "trustBundle": {"configMap": {"name": "r"}},
            },
            "require",
            "/etc/blazen/trust/ca.crt",
        ),
        # Any other issuer may write no ca.crt (ACME): no client certificates, the token the CRD requires.
        (
            {"issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
            "none",
            "/etc/blazen/trust/ca.crt,/etc/blazen/tls/ca.crt",
        ),
    ],
)
def test_tls_client_auth_follows_whether_a_ca_bundle_is_sure_to_exist(tls, mode, ca):
    args = container(peer(tls=tls, auth={"tokenSecretRef": {"name": "t"}}))["args"]
    assert flag(args, "--tls-client-auth") == mode
    assert flag(args, "--tls-ca") == ca
    assert (
        "--tls-client-auth"
        not in container(peer(tls={"enabled": False}, auth={"tokenSecretRef": {"name": "t"}}))["args"]
    )


def test_pod_deletion_cost_is_the_live_refs():
    assert workload.pod_deletion_cost(0) == "0"
    assert workload.pod_deletion_cost(42) == "42"
    assert workload.pod_deletion_cost(10**12) == str(2**31 - 1)  # the annotation is an int32


# ------------------------------------------------------------ namespace CA (issue #15)

TRUST_OWNER = {"apiVersion": "v1", "kind": "ConfigMap", "name": "blazen-trust", "uid": "cm-uid"}


def ca_settings(peers: list[Any]) -> certs.CaSettings | None:
    """The namespace CA's settings as the trust pass folds them, one BlazenPeer at a time."""
    return functools.reduce(certs.strictest, map(certs.ca_request, peers), None)


def test_namespace_ca_has_one_owner_whatever_the_number_of_peers():
    """Every namespace CA object is owned by the trust ConfigMap alone: nothing grows with the BlazenPeers of
    the namespace (before: one ownerReference and one managedFields entry per peer)."""
    settings = ca_settings([peer(f"p{i}") for i in range(50)])
    assert settings is not None
    objs = certs.namespace_ca("ns1", TRUST_OWNER, settings, (1,), 1)
    objs.append(certs.ca_secret_stub("ns1", TRUST_OWNER, 1))
    by = {(m["kind"], m["metadata"]["name"]): m for m in objs}
    assert set(by) == {
        ("Issuer", "blazen-selfsigned"),
        ("Certificate", "blazen-ca"),
        ("Issuer", "blazen-ca"),
        ("Secret", "blazen-ca"),
    }
    for m in objs:
        assert m["metadata"]["ownerReferences"] == [TRUST_OWNER]
        assert common.PEER_LABEL not in m["metadata"]["labels"]
        assert m["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "blazen-operator"
    assert by[("Certificate", "blazen-ca")]["spec"]["isCA"] is True
    assert by[("Issuer", "blazen-ca")]["spec"] == {"ca": {"secretName": "blazen-ca"}}
    assert by[("Issuer", "blazen-selfsigned")]["spec"] == {"selfSigned": {}}
    cm = certs.trust_configmap("ns1")["metadata"]
    assert "ownerReferences" not in cm, "the root: deleted by the operator with the last namespace-CA peer"


def test_namespace_ca_during_a_rotation_keeps_both_generations_and_signs_with_one():
    settings = certs.CaSettings("8760h", "720h", "bp")
    objs = certs.namespace_ca("ns1", TRUST_OWNER, settings, (1, 2), 1)
    cas = {m["metadata"]["name"]: m for m in objs if m["kind"] == "Certificate"}
    assert set(cas) == {"blazen-ca", "blazen-ca-2"}, "the new CA under a new name"
    assert cas["blazen-ca-2"]["spec"]["secretName"] == "blazen-ca-2"
    assert cas["blazen-ca-2"]["metadata"]["labels"][certs.CA_GENERATION_LABEL] == "2"
    issuer = next(m for m in objs if m["kind"] == "Issuer" and m["metadata"]["name"] == "blazen-ca")
    assert issuer["spec"] == {"ca": {"secretName": "blazen-ca"}}, "the old CA keeps signing until switched"
    switched = certs.namespace_ca("ns1", TRUST_OWNER, settings, (1, 2), 2)
    issuer = next(m for m in switched if m["kind"] == "Issuer" and m["metadata"]["name"] == "blazen-ca")
    assert issuer["spec"] == {"ca": {"secretName": "blazen-ca-2"}}
    # cert-manager's own in-place renewal only as a backstop, half-way into the operator's window
    assert cas["blazen-ca"]["spec"]["duration"] == "8760h"
    assert cas["blazen-ca"]["spec"]["renewBefore"] == f"{360 * 3600}s"


def test_the_strictest_ca_setting_wins():
    peers = [
        peer("lax", tls={"ca": {"duration": "87600h", "renewBefore": "2160h"}}),
        peer("strict", tls={"ca": {"duration": "4320h", "renewBefore": "240h"}}),
        peer("strict-b", tls={"ca": {"duration": "4320h", "renewBefore": "480h"}}),
        peer("corp", tls={"issuerRef": {"name": "corp"}, "ca": {"duration": "3000h", "renewBefore": "1h"}}),
    ]
    assert ca_settings(peers) == certs.CaSettings("4320h", "480h", "strict-b")
    assert ca_settings(peers[::-1]) == certs.CaSettings("4320h", "480h", "strict-b"), "whatever the order"
    assert ca_settings([peers[3]]) is None, "a user issuer takes no part in the namespace CA"


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        (
            {"ca": {"duration": "720h", "renewBefore": "720h"}},
            "tls.ca.renewBefore must be shorter than tls.ca",
        ),
        ({"duration": "9000h"}, "tls.ca.duration must be longer than tls.duration"),
        ({"ca": {"duration": "1y"}}, "ca.duration"),
    ],
)
def test_ca_settings_are_validated_with_messages_naming_the_fields(tls, message):
    with pytest.raises(ValueError, match=message):
        parse_spec({**BASE, "tls": tls})


def test_a_user_issuer_may_outlive_the_unused_namespace_ca_setting():
    assert parse_spec({**BASE, "tls": {"issuerRef": {"name": "corp"}, "duration": "9000h"}})
