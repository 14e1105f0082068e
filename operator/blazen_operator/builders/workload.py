"""The Deployment, Services, RBAC, PodDisruptionBudget and NetworkPolicy of a BlazenPeer. Pure functions."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .. import spec as s
from ..fleet_spec import FLEET_LABEL
from . import common as c
from .common import Peer

NODE_ID_ENV = "BLAZEN_PEER_NODE_ID"
HOME_DIR = "/home/blazen"
# Default requests of GPU peers that name none (per GPU): Burstable QoS instead of BestEffort, so a busy
# node neither starves the step's CPU-side work nor evicts the pod first.
GPU_CPU_REQUEST_PER_GPU = 1
GPU_MEMORY_REQUEST_PER_GPU_GI = 4
GPU_SHM_SIZE = "1Gi"
EXIT_MARGIN_SECS = 1  # of terminationGracePeriodSeconds, left for the process to exit after the drain


# ------------------------------------------------------------ placement


def node_selector(p: Peer) -> dict[str, str]:
    out = dict(p.spec.hardware.pool_selector or {})
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
    gpu = p.spec.hardware.gpu
    if gpu > 0:
        requests[p.spec.hardware.gpu_resource_name] = gpu
        limits[p.spec.hardware.gpu_resource_name] = gpu
        requests.setdefault("cpu", GPU_CPU_REQUEST_PER_GPU * gpu)
        requests.setdefault("memory", f"{GPU_MEMORY_REQUEST_PER_GPU_GI * gpu}Gi")
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
        *shutdown_args(p),
        *face_args(p),
    ]
    if sp.steps is not None:
        args += ["--steps", ",".join(sp.steps)]
    args += security_args(p)
    fleet = p.labels.get(FLEET_LABEL)
    if fleet and router_known_by_certificate(sp):
        # a fleet's pool: its router may run single steps here (split runs), known by its certificate
        args += ["--fleet-router-identity", c.fleet_router_host(fleet, p.namespace)]
    return args + fleet_router_token_args(p)


def router_known_by_certificate(sp: s.BlazenPeerSpec) -> bool:
    """A fleet's pools verify client certificates, so they know their router by its certificate's name."""
    return sp.tls.enabled and tls_client_auth(sp) == "require"


def fleet_router_token_fleet(p: Peer) -> str | None:
    """The fleet whose router token this pod holds: a fleet's pool or router (label ``blazen.dev/fleet``)
    whose pools verify no client certificate (token-only or unauthenticated fleets, an issuer without a CA
    bundle). The shared bearer token cannot tell the router from any other caller: it gets one of its own."""
    fleet = p.labels.get(FLEET_LABEL)
    return fleet if fleet and not router_known_by_certificate(p.spec) else None


def fleet_router_token_args(p: Peer) -> list[str]:
    """A pool requires the router token on RunStep/EndRun; the router sends it (the same flag)."""
    if fleet_router_token_fleet(p) is None:
        return []
    return ["--fleet-router-token-file", f"{c.FLEET_ROUTER_TOKEN_DIR}/{c.TOKEN_KEY_PATH}"]


def face_args(p: Peer) -> list[str]:
    """The HTTP shim and the plaintext gRPC opt-in, as spec.http and spec.plaintextGrpc say."""
    sp = p.spec
    args: list[str] = []
    if sp.http.enabled:
        args += ["--http-addr", f"0.0.0.0:{sp.ports.http}", "--http-auth", s.HTTP_AUTH_FLAGS[sp.http.auth]]
        for origin in sp.http.cors_origins:
            args += ["--cors-allow-origin", origin]
    if sp.plaintext_grpc.enabled:
        args += ["--plaintext-grpc-addr", f"0.0.0.0:{sp.ports.plaintext_grpc}"]
    return args


def security_args(p: Peer) -> list[str]:
    """TLS files and the token file, where storage() mounts them."""
    sp = p.spec
    args: list[str] = []
    if sp.tls.enabled:
        args += [
            "--tls-cert",
            f"{c.TLS_DIR}/tls.crt",
            "--tls-key",
            f"{c.TLS_DIR}/tls.key",
            "--tls-ca",
            _ca_files(p),
            "--tls-client-auth",
            tls_client_auth(sp),
        ]
    if sp.auth.token_secret_ref is not None:
        args += ["--token-file", f"{c.TOKEN_DIR}/{c.TOKEN_KEY_PATH}"]
    return args


def tls_client_auth(sp: s.BlazenPeerSpec) -> str:
    """Mutual TLS where a CA bundle is sure to exist: the namespace CA's ca.crt, or tls.trustBundle. Another
    issuer may write no ca.crt (ACME), so its peers ask for no client certificate and authenticate callers by
    the token the CRD requires then; their ca.crt, when the issuer writes one, is what they trust their
    siblings with (else the system roots)."""
    return "require" if sp.tls.issuer_ref is None or sp.tls.trust_bundle is not None else "none"


def _ca_files(p: Peer) -> str:
    """What the pods trust: a bundle of their own (spec.tls.trustBundle or a trust ConfigMap the operator
    keeps), else the leaf Secret's ca.crt. A user issuer's bundle gets a new peer's first CA one trust pass
    after its first leaf, which the kubelet may project before it: until the bundle holds a CA the leaf's own
    ca.crt stands in, so no pod starts without its issuer's CA; from then on the bundle alone (rotations go
    by it)."""
    trust = c.trust_configmap(p)
    if trust is not None and trust != c.TRUST_CONFIGMAP:
        return f"{c.TRUST_DIR}/ca.crt,{c.TLS_DIR}/ca.crt"
    own = p.spec.tls.trust_bundle is not None or trust is not None
    return f"{c.TRUST_DIR if own else c.TLS_DIR}/ca.crt"


def shutdown_args(p: Peer) -> list[str]:
    """The runtime's drain, from the one budget (pod.terminationGracePeriodSeconds) so the kubelet's
    SIGKILL never comes before the runtime is done."""
    pod = p.spec.pod
    args = [
        "--shutdown-grace-secs",
        str(pod.termination_grace_period_seconds - EXIT_MARGIN_SECS),
        "--shutdown-admit-secs",
        str(pod.drain_admit_seconds),
    ]
    if pod.drain_admit_seconds > 0:
        # Every open channel gets a graceful GOAWAY within the admit window, after the endpoints dropped
        # the pod, and reconnects to a replica that stays.
        args += ["--grpc-max-connection-age-secs", f"{pod.drain_admit_seconds / 2:g}"]
    return args


def env(p: Peer) -> list[dict[str, Any]]:
    ours: list[dict[str, Any]] = [
        {"name": NODE_ID_ENV, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        # The root filesystem is read-only: HOME and the caches (torch, Hugging Face, pip) go to an emptyDir.
        {"name": "HOME", "value": HOME_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{HOME_DIR}/.cache"},
    ]
    user = {var.name for var in p.spec.env or []}
    out = [var for var in ours if var["name"] == NODE_ID_ENV or var["name"] not in user]
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


STARTUP_PROBE_PERIOD = 2


def _probe(path: str, *, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "admin", "scheme": "HTTP"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def probes(p: Peer) -> dict[str, Any]:
    pr = p.spec.probes
    startup_failures = -(-pr.startup_budget_seconds // STARTUP_PROBE_PERIOD)
    return {
        # /readyz, not /healthz: the admin port answers while the entrypoint is still imported, so only
        # readiness tells a finished model load from one still running (or hung) - the budget bounds that.
        "startupProbe": _probe(
            "/readyz", period=STARTUP_PROBE_PERIOD, failures=startup_failures, timeout=pr.timeout_seconds
        ),
        "livenessProbe": _probe(
            "/healthz",
            period=pr.liveness_period_seconds,
            failures=pr.liveness_failure_threshold,
            timeout=pr.timeout_seconds,
        ),
        "readinessProbe": _probe(
            "/readyz",
            period=pr.readiness_period_seconds,
            failures=pr.readiness_failure_threshold,
            timeout=pr.timeout_seconds,
        ),
    }


def shm_size(p: Peer) -> s.Quantity | None:
    if p.spec.shm_size is not None:
        return p.spec.shm_size
    return GPU_SHM_SIZE if p.spec.hardware.gpu > 0 else None


def storage(p: Peer) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): scratch and HOME under the read-only root, /dev/shm, TLS, token, the user's."""
    sp = p.spec
    scratch = {"sizeLimit": sp.scratch_size_limit}
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": dict(scratch)},
        {"name": "home", "emptyDir": dict(scratch)},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME_DIR},
    ]
    if (shm := shm_size(p)) is not None:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if sp.tls.enabled:
        # A directory mount (never subPath): the kubelet swaps in renewed files and the runtime reloads them.
        volumes.append({"name": "tls", "secret": {"secretName": c.server_cert_name(p), "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": c.TLS_DIR, "readOnly": True})
    if sp.tls.enabled and (bundle := sp.tls.trust_bundle) is not None:
        if bundle.config_map is not None:
            items = [{"key": bundle.config_map.key, "path": "ca.crt"}]
            volumes.append({"name": "trust", "configMap": {"name": bundle.config_map.name, "items": items}})
        elif bundle.secret is not None:
            items = [{"key": bundle.secret.key, "path": "ca.crt"}]
            volumes.append({"name": "trust", "secret": {"secretName": bundle.secret.name, "items": items}})
        mounts.append({"name": "trust", "mountPath": c.TRUST_DIR, "readOnly": True})
    elif (trust := c.trust_configmap(p)) is not None:
        # The trust bundle the operator maintains: old + new roots during a CA rotation (the leaf Secret's
        # ca.crt holds only the CA that signed that leaf). A user issuer's bundle may never get a CA (ACME
        # writes no ca.crt): optional, so those pods start without one (--tls-client-auth none).
        volume: dict[str, Any] = {"name": trust, "items": [{"key": c.TRUST_KEY, "path": "ca.crt"}]}
        if trust != c.TRUST_CONFIGMAP:
            volume["optional"] = True
        volumes.append({"name": "trust", "configMap": volume})
        mounts.append({"name": "trust", "mountPath": c.TRUST_DIR, "readOnly": True})
    if sp.auth.token_secret_ref is not None:
        # A directory mount too: a rotated token reaches the running pods, which re-read the file.
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
    if (fleet := fleet_router_token_fleet(p)) is not None:
        items = [{"key": c.TOKEN_KEY_PATH, "path": c.TOKEN_KEY_PATH}]
        secret = {"secretName": c.fleet_router_token_secret(fleet), "items": items, "defaultMode": 0o440}
        volumes.append({"name": "fleet-router-token", "secret": secret})
        mounts.append({"name": "fleet-router-token", "mountPath": c.FLEET_ROUTER_TOKEN_DIR, "readOnly": True})
    volumes += [v.dump() for v in sp.volumes or []]
    for m in sp.volume_mounts or []:
        mount: dict[str, Any] = {"name": m.name, "mountPath": m.mount_path, "readOnly": m.read_only}
        if m.sub_path:
            mount["subPath"] = m.sub_path
        mounts.append(mount)
    return volumes, mounts


def topology_spread(p: Peer, selector: dict[str, str]) -> list[dict[str, Any]]:
    """Unset: spread the current revision's pods over nodes, then zones; ScheduleAnyway, so a small or
    unlabelled cluster still schedules them. Also with one replica: scaling must not change the template
    (that would roll every pod)."""
    if p.spec.topology_spread_constraints is not None:
        return copy.deepcopy(p.spec.topology_spread_constraints)
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(selector)},
            "matchLabelKeys": ["pod-template-hash"],
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


@dataclass(frozen=True)
class PodRole:
    """What tells a fleet router's pods from a peer's; everything else about the pod (security context,
    probes, drain and grace, storage, placement) is built the same way for both."""

    container: str
    args: list[str]
    labels: dict[str, str]  # the pod's labels (ours: they win over spec.pod.labels)
    selector: dict[str, str]
    service_account: str
    automount_token: bool = False  # the router reads the Kubernetes API with it


def peer_role(p: Peer) -> PodRole:
    return PodRole(
        container="peer",
        args=peer_args(p),
        labels=c.labels(p),
        selector=c.selector_labels(p),
        service_account=c.service_account_name(p),
    )


def pod_template(p: Peer, role: PodRole | None = None) -> dict[str, Any]:
    sp = p.spec
    role = role or peer_role(p)
    volumes, mounts = storage(p)

    container: dict[str, Any] = {
        "name": role.container,
        "image": sp.image,
        "command": ["blazen-peer"],
        "args": role.args,
        "env": env(p),
        "ports": container_ports(p),
        **probes(p),
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
    pod_labels.update(role.labels)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": role.service_account,
        "automountServiceAccountToken": role.automount_token,
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
    if sp.pod.runtime_class_name:
        pod_spec["runtimeClassName"] = sp.pod.runtime_class_name
    if spread := topology_spread(p, role.selector):
        pod_spec["topologySpreadConstraints"] = spread
    pod_spec["terminationGracePeriodSeconds"] = sp.pod.termination_grace_period_seconds

    template = {"metadata": {"labels": pod_labels, "annotations": dict(sp.pod.annotations)}, "spec": pod_spec}
    return template


DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
_MAX_DELETION_COST = 2**31 - 1


def pod_deletion_cost(session_refs: int) -> str:
    """The ReplicaSet controller deletes pods with the lowest cost first: a pod's live session refs (what a
    caller loses when it goes) are its cost."""
    return str(min(session_refs, _MAX_DELETION_COST))


def config_hash(p: Peer, role: PodRole | None = None) -> str:
    """Hash of everything that shapes the pods: the pod template. Not the token Secret's data: a rotated
    token reaches the running pods through the mounted file, so pods roll only when what they run changes."""
    return c.digest({"template": pod_template(p, role)})


def rolling_update(p: Peer) -> dict[str, Any]:
    """spec.rollout: Surge keeps full capacity (a new pod is ready before an old one stops); Recreate
    replaces one pod at a time without a spare (for GPU pools with no free GPU)."""
    if p.spec.rollout.strategy == "Recreate":
        return {"maxSurge": 0, "maxUnavailable": 1}
    return {"maxSurge": p.spec.rollout.max_surge, "maxUnavailable": 0}


def deployment_spec(p: Peer, role: PodRole | None = None) -> dict[str, Any]:
    role = role or peer_role(p)
    template = pod_template(p, role)
    template["metadata"]["annotations"][c.CONFIG_HASH_ANNOTATION] = config_hash(p, role)
    return {
        "replicas": p.spec.replicas,
        "selector": {"matchLabels": dict(role.selector)},
        "revisionHistoryLimit": 5,
        # A rollout is stuck (Degraded) only once a new pod had its whole startup budget.
        "progressDeadlineSeconds": max(600, p.spec.probes.startup_budget_seconds + 300),
        "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling_update(p)},
        "template": template,
    }


def deployment(p: Peer) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": c.metadata(p, c.deployment_name(p)),
        "spec": deployment_spec(p),
    }


# ------------------------------------------------------------ services


def service_ports(p: Peer) -> list[dict[str, Any]]:
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
    return ports


def service(p: Peer) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(p, c.service_name(p)),
        "spec": {"type": "ClusterIP", "selector": c.selector_labels(p), "ports": service_ports(p)},
    }


def headless_service(p: Peer) -> dict[str, Any]:
    sp = p.spec
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": c.metadata(p, c.headless_name(p)),
        "spec": {
            "clusterIP": "None",
            # Sibling discovery for session-ref forwarding: a stopping pod keeps answering deref/release for
            # the refs it holds until its grace ends, so it must stay listed (starting pods are listed too;
            # forwarding skips whoever does not answer). Clients load-balance through the ClusterIP Service.
            "publishNotReadyAddresses": True,
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


def pod_disruption_budget_spec(p: Peer, selector: dict[str, str]) -> dict[str, Any] | None:
    db = p.spec.disruption_budget
    if not db.enabled or p.spec.replicas <= 1:
        return None
    spec: dict[str, Any] = {"selector": {"matchLabels": dict(selector)}}
    if db.min_available is not None:
        spec["minAvailable"] = db.min_available
    else:
        spec["maxUnavailable"] = db.max_unavailable if db.max_unavailable is not None else 1
    return spec


def pod_disruption_budget(p: Peer) -> dict[str, Any] | None:
    spec = pod_disruption_budget_spec(p, c.selector_labels(p))
    if spec is None:
        return None
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


def network_policy_spec(p: Peer, selector: dict[str, str]) -> dict[str, Any] | None:
    """Ingress of the pods ``selector`` picks: the TLS ports (gRPC, HTTP) to networkPolicy.allowedFrom and
    the pods themselves (everyone when empty), the plain-HTTP admin port fenced, the plaintext gRPC port
    only from plaintextGrpc.allowedFrom."""
    sp = p.spec
    if not (sp.network_policy.enabled or sp.plaintext_grpc.enabled):
        return None
    own = {"podSelector": {"matchLabels": dict(selector)}}
    tls_ports = [{"port": sp.ports.grpc, "protocol": "TCP"}]
    if sp.http.enabled:
        tls_ports.append({"port": sp.ports.http, "protocol": "TCP"})
    tls_rule: dict[str, Any] = {"ports": tls_ports}
    admin_rule: dict[str, Any] = {"ports": [{"port": sp.ports.admin, "protocol": "TCP"}]}
    ingress = [tls_rule]
    if sp.network_policy.enabled:
        if sp.network_policy.allowed_from:
            tls_rule["from"] = [own, *_peers(sp.network_policy.allowed_from)]
        # The plain-HTTP admin port (/metrics, /v1/info) is fenced to the operator and monitoring. Kubelet
        # probes come from the node, which CNIs admit regardless of policy. A rule without `from` would
        # admit everyone, so with nobody to admit there is no rule at all.
        admin_from = [p.operator.network_peer()] if p.operator is not None else []
        admin_from += _peers(sp.network_policy.admin_allowed_from)
        if admin_from:
            admin_rule["from"] = admin_from
            ingress.append(admin_rule)
    else:
        ingress.append(admin_rule)  # the policy exists only to fence the plaintext port
    if sp.plaintext_grpc.enabled:
        ingress.append(
            {
                "ports": [{"port": sp.ports.plaintext_grpc, "protocol": "TCP"}],
                "from": _peers(sp.plaintext_grpc.allowed_from),
            }
        )
    return {
        "podSelector": {"matchLabels": dict(selector)},
        "policyTypes": ["Ingress"],
        "ingress": ingress,
    }


def network_policy(p: Peer) -> dict[str, Any] | None:
    spec = network_policy_spec(p, c.selector_labels(p))
    if spec is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": c.metadata(p, c.deployment_name(p)),
        "spec": spec,
    }
