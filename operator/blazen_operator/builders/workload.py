"""The Deployment, Services, RBAC, PodDisruptionBudget and NetworkPolicy of a BlazenPeer. Pure functions."""

from __future__ import annotations

import copy
from typing import Any

from .. import spec as s
from . import common as c
from .common import Peer

NODE_ID_ENV = "BLAZEN_PEER_NODE_ID"


# ------------------------------------------------------------ placement


def node_selector(p: Peer) -> dict[str, str]:
    hw = p.spec.hardware
    out: dict[str, str] = {}
    if hw.gpu > 0:
        out.update(s.DEFAULT_GPU_POOL_SELECTOR if hw.pool_selector is None else hw.pool_selector)
    elif hw.pool_selector:
        out.update(hw.pool_selector)
    out.update(p.spec.node_selector or {})
    return out


def tolerations(p: Peer) -> list[dict[str, Any]]:
    hw = p.spec.hardware
    out: list[dict[str, Any]] = []
    if hw.gpu > 0 and hw.tolerate_gpu_taint:
        out.append({"key": hw.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    out += [t.dump() for t in p.spec.tolerations or []]
    return out


def resources(p: Peer) -> dict[str, Any]:
    res = p.spec.resources
    requests = dict(res.requests or {})
    limits = dict(res.limits or {})
    if p.spec.hardware.gpu > 0:
        requests[p.spec.hardware.gpu_resource_name] = p.spec.hardware.gpu
        limits[p.spec.hardware.gpu_resource_name] = p.spec.hardware.gpu
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: requests[k] for k in sorted(requests)}
    if limits:
        out["limits"] = {k: limits[k] for k in sorted(limits)}
    return out


# ------------------------------------------------------------ container


def peer_args(p: Peer) -> list[str]:
    sp = p.spec
    ports = sp.ports
    args = [
        "serve",
        "--entrypoint",
        sp.entrypoint,
        "--grpc-addr",
        f"0.0.0.0:{ports.grpc}",
        "--admin-addr",
        f"0.0.0.0:{ports.admin}",
        "--forward-dns",
        c.headless_host(p),
    ]
    if sp.http.enabled:
        args += ["--http-addr", f"0.0.0.0:{ports.http}"]
        for origin in sp.http.cors_origins:
            args += ["--cors-allow-origin", origin]
    if sp.plaintext_grpc.enabled:
        args += ["--plaintext-grpc-addr", f"0.0.0.0:{ports.plaintext_grpc}"]
    if sp.steps is not None:
        args += ["--steps", ",".join(sp.steps)]
    if sp.tls.enabled:
        args += [
            "--tls-cert",
            f"{c.TLS_DIR}/tls.crt",
            "--tls-key",
            f"{c.TLS_DIR}/tls.key",
            "--tls-ca",
            f"{c.TLS_DIR}/ca.crt",
        ]
    if sp.auth.token_secret_ref is not None:
        args += ["--token-file", f"{c.TOKEN_DIR}/{c.TOKEN_KEY_PATH}"]
    return args


def env(p: Peer) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": NODE_ID_ENV, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
    ]
    for var in p.spec.env or []:
        if var.name != NODE_ID_ENV:  # the node id is always the pod name
            out.append(var.dump())
    return out


def container_ports(p: Peer) -> list[dict[str, Any]]:
    sp = p.spec
    ports = [{"name": "grpc", "containerPort": sp.ports.grpc, "protocol": "TCP"}]
    if sp.http.enabled:
        ports.append({"name": "http", "containerPort": sp.ports.http, "protocol": "TCP"})
    ports.append({"name": "admin", "containerPort": sp.ports.admin, "protocol": "TCP"})
    if sp.plaintext_grpc.enabled:
        ports.append({"name": "grpc-plain", "containerPort": sp.ports.plaintext_grpc, "protocol": "TCP"})
    return ports


def _probe(path: str, *, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def pod_template(p: Peer) -> dict[str, Any]:
    sp = p.spec
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if sp.tls.enabled:
        # A directory mount (never subPath): the kubelet swaps in renewed files and the runtime reloads them.
        volumes.append({"name": "tls", "secret": {"secretName": c.server_cert_name(p), "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": c.TLS_DIR, "readOnly": True})
    if sp.auth.token_secret_ref is not None:
        ref = sp.auth.token_secret_ref
        volumes.append(
            {
                "name": "token",
                "secret": {
                    "secretName": ref.name,
                    "items": [{"key": ref.key, "path": c.TOKEN_KEY_PATH}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "token", "mountPath": c.TOKEN_DIR, "readOnly": True})

    container: dict[str, Any] = {
        "name": "peer",
        "image": sp.image,
        "command": ["blazen-peer"],
        "args": peer_args(p),
        "env": env(p),
        "ports": container_ports(p),
        "startupProbe": _probe("/healthz", period=2, failures=150),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "resources": resources(p),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    if sp.image_pull_policy:
        container["imagePullPolicy"] = sp.image_pull_policy

    pod_labels = dict(sp.pod.labels)
    pod_labels.update(c.labels(p))
    pod_spec: dict[str, Any] = {
        "serviceAccountName": c.service_account_name(p),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if sel := node_selector(p):
        pod_spec["nodeSelector"] = sel
    if tol := tolerations(p):
        pod_spec["tolerations"] = tol
    if sp.affinity:
        pod_spec["affinity"] = copy.deepcopy(sp.affinity)
    if sp.pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": r.name} for r in sp.pod.image_pull_secrets]
    if sp.pod.priority_class_name:
        pod_spec["priorityClassName"] = sp.pod.priority_class_name
    if sp.pod.termination_grace_period_seconds is not None:
        pod_spec["terminationGracePeriodSeconds"] = sp.pod.termination_grace_period_seconds

    template = {"metadata": {"labels": pod_labels, "annotations": dict(sp.pod.annotations)}, "spec": pod_spec}
    return template


def config_hash(p: Peer) -> str:
    """Hash of everything that shapes the pods: the pod template and the token Secret's data."""
    return c.digest({"template": pod_template(p), "token": p.token_digest})


def rolling_update(p: Peer) -> dict[str, Any]:
    """Surge a new pod before stopping an old one, except on GPU pools, which rarely have a spare GPU:
    there one pod at a time is replaced, so a full pool never deadlocks a rollout."""
    if p.spec.hardware.gpu > 0:
        return {"maxSurge": 0, "maxUnavailable": 1}
    return {"maxSurge": 1, "maxUnavailable": 0}


def deployment(p: Peer) -> dict[str, Any]:
    template = pod_template(p)
    template["metadata"]["annotations"][c.CONFIG_HASH_ANNOTATION] = config_hash(p)
    if p.token_digest is not None:
        # A token change rolls the pods (the runtime reads the token file at start).
        template["metadata"]["annotations"][c.TOKEN_DIGEST_ANNOTATION] = p.token_digest[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(p, c.deployment_name(p)),
        "spec": {
            "replicas": p.spec.replicas,
            "selector": {"matchLabels": c.selector_labels(p)},
            "revisionHistoryLimit": 5,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling_update(p)},
            "template": template,
        },
    }


# ------------------------------------------------------------ services


def service(p: Peer) -> dict[str, Any]:
    sp = p.spec
    ports = [
        {
            "name": "grpc",
            "port": sp.ports.grpc,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        }
    ]
    if sp.http.enabled:
        proto = "https" if sp.tls.enabled else "http"
        ports.append(
            {
                "name": "http",
                "port": sp.ports.http,
                "targetPort": "http",
                "protocol": "TCP",
                "appProtocol": proto,
            }
        )
    if sp.plaintext_grpc.enabled:
        ports.append(
            {
                "name": "grpc-plain",
                "port": sp.ports.plaintext_grpc,
                "targetPort": "grpc-plain",
                "protocol": "TCP",
                "appProtocol": "grpc",
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(p, c.service_name(p)),
        "spec": {"type": "ClusterIP", "selector": c.selector_labels(p), "ports": ports},
    }


def headless_service(p: Peer) -> dict[str, Any]:
    sp = p.spec
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(p, c.headless_name(p)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": c.selector_labels(p),
            "ports": [
                {"name": "grpc", "port": sp.ports.grpc, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "admin", "port": sp.ports.admin, "targetPort": "admin", "protocol": "TCP"},
            ],
        },
    }


# ------------------------------------------------------------ rbac


def rbac(p: Peer) -> list[dict[str, Any]]:
    """The pods' own identity. The runtime needs no API access, so the Role grants nothing and the token is
    never mounted; the objects exist so that the identity is per-peer and auditable."""
    if p.spec.pod.service_account_name:
        return []
    name = c.rbac_name(p)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": c.metadata(p, name),
            "automountServiceAccountToken": False,
            "imagePullSecrets": [{"name": r.name} for r in p.spec.pod.image_pull_secrets],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": c.metadata(p, name),
            "rules": [],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": c.metadata(p, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": p.namespace}],
        },
    ]


# ------------------------------------------------------------ policy


def pod_disruption_budget(p: Peer) -> dict[str, Any] | None:
    db = p.spec.disruption_budget
    if not db.enabled or p.spec.replicas <= 1:
        return None
    spec: dict[str, Any] = {"selector": {"matchLabels": c.selector_labels(p)}}
    if db.min_available is not None:
        spec["minAvailable"] = db.min_available
    else:
        spec["maxUnavailable"] = db.max_unavailable if db.max_unavailable is not None else 1
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": c.metadata(p, c.deployment_name(p)),
        "spec": spec,
    }


def _peers(items: list[s.NetworkPeer]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        peer: dict[str, Any] = {}
        if item.namespace_selector is not None:
            peer["namespaceSelector"] = copy.deepcopy(item.namespace_selector)
        if item.pod_selector is not None:
            peer["podSelector"] = copy.deepcopy(item.pod_selector)
        if not peer:
            peer["podSelector"] = {}
        out.append(peer)
    return out


def network_policy(p: Peer) -> dict[str, Any] | None:
    sp = p.spec
    if not (sp.network_policy.enabled or sp.plaintext_grpc.enabled):
        return None
    own = {"podSelector": {"matchLabels": c.selector_labels(p)}}
    tls_ports = [{"port": sp.ports.grpc, "protocol": "TCP"}]
    if sp.http.enabled:
        tls_ports.append({"port": sp.ports.http, "protocol": "TCP"})
    tls_rule: dict[str, Any] = {"ports": tls_ports}
    if sp.network_policy.enabled and sp.network_policy.allowed_from:
        tls_rule["from"] = [own, *_peers(sp.network_policy.allowed_from)]
    ingress = [
        tls_rule,
        # probes, metrics and the operator's /v1/info reads
        {"ports": [{"port": sp.ports.admin, "protocol": "TCP"}]},
    ]
    if sp.plaintext_grpc.enabled:
        ingress.append(
            {
                "ports": [{"port": sp.ports.plaintext_grpc, "protocol": "TCP"}],
                "from": _peers(sp.plaintext_grpc.allowed_from),
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": c.metadata(p, c.deployment_name(p)),
        "spec": {
            "podSelector": {"matchLabels": c.selector_labels(p)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
