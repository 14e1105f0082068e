"""Names, labels, owner references and hashing shared by every builder. Pure: no I/O."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .. import spec as s

MANAGED_BY = "blazen-operator"
PEER_LABEL = "blazen.dev/peer"
CONFIG_HASH_ANNOTATION = "blazen.dev/config-hash"

TLS_DIR = "/etc/blazen/tls"
TOKEN_DIR = "/etc/blazen/token"
TRUST_DIR = "/etc/blazen/trust"
TOKEN_KEY_PATH = "token"

CA_SELFSIGNED_ISSUER = "blazen-selfsigned"
CA_NAME = "blazen-ca"  # Certificate, its Secret and the CA Issuer share the name

# Label/annotation prefixes of tooling that must not be copied from the BlazenPeer to its children.
_NOT_PROPAGATED = ("kopf.zalando.org", "kubectl.kubernetes.io", "blazen.dev/", "app.kubernetes.io/")


@dataclass(frozen=True)
class Peer:
    """Everything the builders need about one BlazenPeer."""

    name: str
    namespace: str
    spec: s.BlazenPeerSpec
    uid: str = "00000000-0000-0000-0000-000000000000"
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_body(cls, body: Any) -> Peer:
        meta = body["metadata"]
        return cls(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta.get("uid") or cls.uid,
            labels=dict(meta.get("labels") or {}),
            spec=s.parse_spec(body.get("spec")),
        )


# ------------------------------------------------------------ names


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
    out = {k: v for k, v in sorted(p.labels.items()) if not k.startswith(_NOT_PROPAGATED)}
    out.update(selector_labels(p))
    out.update(
        {
            "app.kubernetes.io/managed-by": MANAGED_BY,
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


def metadata(p: Peer, name: str, *, controller: bool = True, extra_labels: dict[str, str] | None = None):
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
