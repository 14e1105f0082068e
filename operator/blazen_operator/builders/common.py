"""Names, labels, owner references and hashing shared by every builder. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .. import fleet_spec as fs
from .. import spec as s
from ..kinds import MANAGED_BY, MANAGED_BY_LABEL

PEER_LABEL = "blazen.dev/peer"
CONFIG_HASH_ANNOTATION = "blazen.dev/config-hash"

TLS_DIR = "/etc/blazen/tls"
TOKEN_DIR = "/etc/blazen/token"
TRUST_DIR = "/etc/blazen/trust"
TOKEN_KEY_PATH = "token"

CA_SELFSIGNED_ISSUER = "blazen-selfsigned"
CA_NAME = "blazen-ca"  # the CA Issuer; also the Certificate and Secret of CA generation 1
TRUST_CONFIGMAP = "blazen-trust"  # the namespace trust bundle (key ca.crt) and the CA rotation state
TRUST_KEY = "ca.crt"

_NO_UID = "00000000-0000-0000-0000-000000000000"  # `render` has no API server to assign one

# Label/annotation prefixes of tooling that must not be copied from the BlazenPeer to its children.
_NOT_PROPAGATED = ("kopf.zalando.org", "kubectl.kubernetes.io", "blazen.dev/", "app.kubernetes.io/")
# ...except a fleet pool's two labels: on both Services they reach the EndpointSlices (the EndpointSlice
# controller copies a Service's labels), which is how a fleet's router finds its pools' pods.
PROPAGATED_FLEET_LABELS = (fs.FLEET_LABEL, fs.POOL_LABEL)


@dataclass(frozen=True)
class OperatorIdentity:
    """Where the operator's own pods run: the NetworkPolicy admits them (and only them, besides monitoring) to
    the peers' admin port, which serves /v1/info to the operator."""

    namespace: str
    pod_labels: tuple[tuple[str, str], ...]

    def network_peer(self) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
            "podSelector": {"matchLabels": dict(self.pod_labels)},
        }


@dataclass(frozen=True)
class Peer:
    """Everything the builders need about one BlazenPeer."""

    name: str
    namespace: str
    spec: s.BlazenPeerSpec
    uid: str = _NO_UID
    labels: dict[str, str] = field(default_factory=dict)
    # None: the operator runs outside the pod network (or `render` was not told), so no pod is admitted for it
    operator: OperatorIdentity | None = None

    @classmethod
    def from_body(cls, body: Any, operator: OperatorIdentity | None = None) -> Peer:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid") or _NO_UID,
            labels=dict(meta.get("labels") or {}),
            spec=s.parse_spec(body.get("spec")),
            operator=operator,
        )


# ------------------------------------------------------------ names


def uses_namespace_ca(p: Peer) -> bool:
    """TLS with the CA the operator bootstraps (and rotates) for the namespace."""
    return p.spec.tls.enabled and p.spec.tls.issuer_ref is None


def issuer_trust_configmap(ref: s.IssuerRef) -> str:
    """The trust bundle the operator keeps for a user issuer's peers (tls.issuerRef, no tls.trustBundle): the
    CAs its leaves' ca.crt name, old and new while the issuer's CA changes."""
    name = f"{TRUST_CONFIGMAP}-{ref.kind.lower()}-{ref.name}"
    if ref.group != "cert-manager.io":
        name += "-" + hashlib.sha256(ref.group.encode()).hexdigest()[:8]
    if len(name) > 253:  # a ConfigMap name is a DNS subdomain, as an issuer's name is
        key = f"{ref.group}/{ref.kind}/{ref.name}".encode()
        name = f"{TRUST_CONFIGMAP}-{ref.kind.lower()}-{hashlib.sha256(key).hexdigest()[:16]}"
    return name


def trust_configmap(p: Peer) -> str | None:
    """The trust bundle ConfigMap the operator keeps and this peer's pods read; None: the pods read
    tls.trustBundle (the user's) or no TLS."""
    tls = p.spec.tls
    if not tls.enabled or tls.trust_bundle is not None:
        return None
    return TRUST_CONFIGMAP if tls.issuer_ref is None else issuer_trust_configmap(tls.issuer_ref)


def deployment_name(p: Peer) -> str:
    return p.name


def service_name(p: Peer) -> str:
    return p.name


def headless_name(p: Peer) -> str:
    return f"{p.name}-peers"


def server_cert_name(p: Peer) -> str:
    return f"{p.name}-tls"


def client_cert_name(p: Peer) -> str:
    return f"{p.name}-client-tls"


def rbac_name(p: Peer) -> str:
    return f"{p.name}-peer"


def service_account_name(p: Peer) -> str:
    return p.spec.pod.service_account_name or rbac_name(p)


def fleet_router_host(fleet: str, namespace: str) -> str:
    """The fleet router's Service name: a DNS name of its certificate, which its pools trust to run single
    steps of split runs (--fleet-router-identity)."""
    return f"{fleet}.{namespace}.svc"


def svc_host(p: Peer) -> str:
    return f"{service_name(p)}.{p.namespace}.svc"


def headless_host(p: Peer) -> str:
    return f"{headless_name(p)}.{p.namespace}.svc"


# ------------------------------------------------------------ labels


def selector_labels(p: Peer) -> dict[str, str]:
    return {"app.kubernetes.io/name": "blazen-peer", "app.kubernetes.io/instance": p.name}


def selector_string(p: Peer) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(p).items()))


def labels(p: Peer) -> dict[str, str]:
    """Labels of every child: the BlazenPeer's own (minus tooling prefixes), then ours."""
    out = {
        k: v
        for k, v in sorted(p.labels.items())
        if not k.startswith(_NOT_PROPAGATED) or k in PROPAGATED_FLEET_LABELS
    }
    out.update(selector_labels(p))
    out.update(
        {
            MANAGED_BY_LABEL: MANAGED_BY,
            "app.kubernetes.io/part-of": "blazen-fleet",
            PEER_LABEL: p.name,
        }
    )
    return out


def owner_reference(p: Peer, *, controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": s.API_VERSION,
        "kind": s.KIND,
        "name": p.name,
        "uid": p.uid,
        "controller": controller,
        "blockOwnerDeletion": controller,
    }


def metadata(
    p: Peer, name: str, *, controller: bool = True, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": p.namespace,
        "labels": labels(p) if extra_labels is None else extra_labels,
        "ownerReferences": [owner_reference(p, controller=controller)],
    }
    return meta


def digest(obj: Any, length: int = 16) -> str:
    """A stable short sha256 of a JSON-able object."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:length]
