"""Pure builders of a BlazenFleet's router: Deployment <fleet>-router (`blazen-peer route --fleet`),
Service <fleet>, ServiceAccount/Role/RoleBinding <fleet>-router, Certificate <fleet>-router-tls, PDB and
NetworkPolicy; and, when the router verifies client certificates, the fleet's callers' Certificate
<fleet>-client-tls.

The router pod is built by the peer's pod builders (workload.py) from a BlazenPeer-shaped view of the router
(:func:`router_peer`): same security context, probes, drain and grace, storage, TLS and token mounts. Only its
role differs: the container runs `route`, carries the router's labels and reads the Kubernetes API."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import spec as s
from ..fleet_spec import FLEET_LABEL
from . import certs, workload
from . import common as c
from .fleet import Fleet, fleet_labels, metadata, router_labels, router_name, router_selector

# The router runs no user code; BlazenPeerSpec wants an entrypoint, which the router's args never carry.
_NO_ENTRYPOINT = "blazen_peer"
# Pool refresh (Describe) at most this often, and at least twice per pool drain-admit window, so a draining
# replica is known "not ready" before its listeners close (docs/router.md).
MAX_REFRESH_SECS = 10
DISCOVERY_RULES = [
    {"apiGroups": [s.GROUP], "resources": [s.PLURAL], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]


def router_peer(f: Fleet) -> c.Peer:
    """The router as a BlazenPeer-shaped object for the shared pod builders: its listeners, pod settings,
    probes and placement from spec.router, image and TLS/token from the fleet."""
    r = f.spec.router
    image = r.image or f.spec.image
    assert image is not None  # the CRD requires spec.image or spec.router.image
    spec = s.BlazenPeerSpec(
        image=image,
        image_pull_policy=r.image_pull_policy or f.spec.image_pull_policy,
        entrypoint=_NO_ENTRYPOINT,
        replicas=r.replicas,
        resources=r.resources,
        node_selector=r.node_selector,
        tolerations=r.tolerations,
        affinity=r.affinity,
        tls=f.spec.tls,
        auth=f.spec.auth,
        http=r.http,
        ports=r.ports,
        plaintext_grpc=r.plaintext_grpc,
        network_policy=r.network_policy,
        disruption_budget=r.disruption_budget,
        pod=r.pod,
        probes=r.probes,
        topology_spread_constraints=r.topology_spread_constraints,
    )
    # the fleet label: the pod builders give the router its fleet's router token where the pools need one
    labels = {FLEET_LABEL: f.name}
    return c.Peer(
        name=router_name(f), namespace=f.namespace, spec=spec, uid=f.uid, labels=labels, operator=f.operator
    )


def refresh_secs(f: Fleet) -> int:
    drains = [p.drain_admit_seconds for p in _pool_pods(f)]
    return max(1, min([MAX_REFRESH_SECS, *(d // 2 for d in drains)]))


def _pool_pods(f: Fleet) -> list[s.PodOverrides]:
    return [pool.pod or f.spec.pod or s.PodOverrides() for pool in f.spec.pools]


def router_args(f: Fleet, rp: c.Peer) -> list[str]:
    ports = rp.spec.ports
    return [
        "route",
        "--fleet",
        f.name,
        "--grpc-addr",
        f"0.0.0.0:{ports.grpc}",
        "--admin-addr",
        f"0.0.0.0:{ports.admin}",
        "--pool-refresh-secs",
        str(refresh_secs(f)),
        *workload.shutdown_args(rp),
        *workload.face_args(rp),
        *workload.security_args(rp),
        *workload.fleet_router_token_args(rp),
        *max_concurrent_args(f),
        # no --pool-server-name: with --fleet the router checks each pool's certificate for <peer>.<ns>.svc
    ]


def max_concurrent_args(f: Fleet) -> list[str]:
    n = f.spec.router.max_concurrent_workflows
    return [] if n is None else ["--max-concurrent-workflows", str(n)]


def role(f: Fleet, rp: c.Peer) -> workload.PodRole:
    return workload.PodRole(
        container="router",
        args=router_args(f, rp),
        labels=router_labels(f),
        selector=router_selector(f),
        service_account=router_name(f),
        automount_token=True,
    )


def selector_string(f: Fleet) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(router_selector(f).items()))


def service_name(f: Fleet) -> str:
    return f.name


def svc_host(f: Fleet) -> str:
    return c.fleet_router_host(f.name, f.namespace)


def cert_name(f: Fleet) -> str:
    return f"{router_name(f)}-tls"


# ------------------------------------------------------------ objects


def deployment(f: Fleet) -> dict[str, Any]:
    rp = router_peer(f)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(f, router_name(f), router_labels(f)),
        "spec": workload.deployment_spec(rp, role(f, rp)),
    }


def config_hash(f: Fleet) -> str:
    rp = router_peer(f)
    return workload.config_hash(rp, role(f, rp))


def service(f: Fleet) -> dict[str, Any]:
    rp = router_peer(f)
    # admin too: the router's /metrics and /v1/info (its routing table) behind one name; the
    # NetworkPolicy fences it as a peer's
    admin = {"name": "admin", "port": rp.spec.ports.admin, "targetPort": "admin", "protocol": "TCP"}
    ports = [*workload.service_ports(rp), admin]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(f, service_name(f), router_labels(f)),
        "spec": {"type": "ClusterIP", "selector": router_selector(f), "ports": ports},
    }


def rbac(f: Fleet) -> list[dict[str, Any]]:
    """The router's identity: read-only, in its namespace, on what discovery watches (its fleet's
    BlazenPeers and their EndpointSlices). Nothing else: no Secrets, no writes."""
    name = router_name(f)
    labels = router_labels(f)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(f, name, labels),
            # the router pod mounts its token explicitly (automountServiceAccountToken on the pod)
            "automountServiceAccountToken": False,
            "imagePullSecrets": [{"name": r.name} for r in f.spec.router.pod.image_pull_secrets],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(f, name, labels),
            "rules": DISCOVERY_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(f, name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": f.namespace}],
        },
    ]


def dns_names(f: Fleet) -> list[str]:
    svc = service_name(f)
    return [svc, f"{svc}.{f.namespace}", f"{svc}.{f.namespace}.svc", f"{svc}.{f.namespace}.svc.cluster.local"]


def certificate(f: Fleet) -> dict[str, Any]:
    """The router's serving certificate, which is also the client identity it presents to the pools (they
    verify client certificates against the same CA): usages server auth and client auth."""
    rp = router_peer(f)
    tls = f.spec.tls
    name = cert_name(f)
    return {
        "apiVersion": certs.CM_API,
        "kind": "Certificate",
        "metadata": metadata(f, name, router_labels(f)),
        "spec": {
            "secretName": name,
            "secretTemplate": {"labels": router_labels(f)},
            "commonName": svc_host(f),
            "dnsNames": dns_names(f),
            "duration": tls.duration,
            "renewBefore": tls.renew_before,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
            "issuerRef": certs.issuer_ref(rp),
        },
    }


def secret_stub(f: Fleet, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A certificate's Secret, created empty with the fleet's owner reference (as a BlazenPeer's)."""
    stub = certs.secret_stub(router_peer(f), name)
    stub["metadata"] = metadata(f, name, labels)
    return stub


def verifies_client_certificates(f: Fleet) -> bool:
    """The router asks callers for a client certificate of the fleet's CA (as the pools do)."""
    return workload.router_known_by_certificate(router_peer(f).spec)


def client_cert_name(f: Fleet) -> str:
    return f"{f.name}-client-tls"


def client_certificate(f: Fleet) -> dict[str, Any]:
    """What the fleet's callers present to the router: a BlazenPeer's client certificate, named for the
    fleet (<fleet>-client-tls, common name <fleet>-client.<ns>), from the router's issuer. It carries no
    DNS name, so no pool takes it for the router (--fleet-router-identity names the router's Service)."""
    caller = dataclasses.replace(router_peer(f), name=f.name)
    cert = certs.client_certificate(caller)
    cert["metadata"] = metadata(f, client_cert_name(f), fleet_labels(f))
    cert["spec"]["secretTemplate"] = {"labels": fleet_labels(f)}
    return cert


def token_secret_name(f: Fleet) -> str:
    return c.fleet_router_token_secret(f.name)


def token_secret(f: Fleet) -> dict[str, Any] | None:
    """The router's own token, where the pools cannot know it by its certificate: created once with a
    random value (``Child.random_key``), owned by the fleet, never rewritten. None with mutual TLS."""
    if workload.fleet_router_token_fleet(router_peer(f)) is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": metadata(f, token_secret_name(f), router_labels(f)),
    }


def secret_names(f: Fleet) -> tuple[str, ...]:
    """The Secrets a fleet owns by name, whether or not it wants them now (pruned by name, never listed)."""
    return (cert_name(f), client_cert_name(f), token_secret_name(f))


def pod_disruption_budget(f: Fleet) -> dict[str, Any] | None:
    spec = workload.pod_disruption_budget_spec(router_peer(f), router_selector(f))
    if spec is None:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(f, router_name(f), router_labels(f)),
        "spec": spec,
    }


def network_policy(f: Fleet) -> dict[str, Any] | None:
    """As a peer's: gRPC and HTTP (TLS) open to router.networkPolicy.allowedFrom (everyone when empty), the
    admin port fenced to the operator and adminAllowedFrom, the plaintext port only from its allowedFrom."""
    spec = workload.network_policy_spec(router_peer(f), router_selector(f))
    if spec is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(f, router_name(f), router_labels(f)),
        "spec": spec,
    }


def endpoints(f: Fleet) -> s.Endpoints:
    r = f.spec.router
    host = svc_host(f)
    out = s.Endpoints(grpc=f"{host}:{r.ports.grpc}")
    if r.http.enabled:
        out.http = f"{'https' if f.spec.tls.enabled else 'http'}://{host}:{r.ports.http}"
    if r.plaintext_grpc.enabled:
        out.plaintext_grpc = f"{host}:{r.ports.plaintext_grpc}"
    return out
