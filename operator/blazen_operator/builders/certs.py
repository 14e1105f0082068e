"""cert-manager objects: the namespace CA bootstrap, the serving Certificate and the client Certificate."""

from __future__ import annotations

from typing import Any

from ..kinds import MANAGED_BY, MANAGED_BY_LABEL
from . import common as c
from .common import Peer

CM_API = "cert-manager.io/v1"
CA_DURATION = "87600h"  # 10 years; the leaves are short-lived
CA_RENEW_BEFORE = "720h"


def issuer_ref(p: Peer) -> dict[str, str]:
    ref = p.spec.tls.issuer_ref
    if ref is not None:
        return {"name": ref.name, "kind": ref.kind, "group": ref.group}
    return {"name": c.CA_NAME, "kind": "Issuer", "group": "cert-manager.io"}


# Shared namespace objects carry no per-peer label, so pruning one peer never touches them.
SHARED_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/part-of": "blazen-fleet"}


def namespace_ca(p: Peer) -> list[dict[str, Any]]:
    """Self-signed Issuer -> CA Certificate -> CA Issuer, shared by every BlazenPeer of the namespace.

    Each BlazenPeer applies them with its own field manager and a non-controller owner reference, so each owns
    only its reference: garbage collection deletes the CA with the last BlazenPeer that uses it.
    """
    if not p.spec.tls.enabled or p.spec.tls.issuer_ref is not None:
        return []
    labels = SHARED_LABELS
    return [
        {
            "apiVersion": CM_API,
            "kind": "Issuer",
            "metadata": c.metadata(p, c.CA_SELFSIGNED_ISSUER, controller=False, extra_labels=labels),
            "spec": {"selfSigned": {}},
        },
        {
            "apiVersion": CM_API,
            "kind": "Certificate",
            "metadata": c.metadata(p, c.CA_NAME, controller=False, extra_labels=labels),
            "spec": {
                "isCA": True,
                "commonName": f"blazen-ca.{p.namespace}",
                "secretName": c.CA_NAME,
                "duration": CA_DURATION,
                "renewBefore": CA_RENEW_BEFORE,
                "privateKey": {"algorithm": "ECDSA", "size": 256},
                "issuerRef": {"name": c.CA_SELFSIGNED_ISSUER, "kind": "Issuer", "group": "cert-manager.io"},
            },
        },
        {
            "apiVersion": CM_API,
            "kind": "Issuer",
            "metadata": c.metadata(p, c.CA_NAME, controller=False, extra_labels=labels),
            "spec": {"ca": {"secretName": c.CA_NAME}},
        },
    ]


def dns_names(p: Peer) -> list[str]:
    names: list[str] = []
    for svc in (c.service_name(p), c.headless_name(p)):
        names += [
            svc,
            f"{svc}.{p.namespace}",
            f"{svc}.{p.namespace}.svc",
            f"{svc}.{p.namespace}.svc.cluster.local",
        ]
    # per-pod names under the headless Service (<pod-ip-dashed>.<headless>.<ns>.svc)
    names += [f"*.{c.headless_host(p)}", f"*.{c.headless_host(p)}.cluster.local"]
    return names


def server_certificate(p: Peer) -> dict[str, Any]:
    tls = p.spec.tls
    return {
        "apiVersion": CM_API,
        "kind": "Certificate",
        "metadata": c.metadata(p, c.server_cert_name(p)),
        "spec": {
            "secretName": c.server_cert_name(p),
            "secretTemplate": {"labels": c.labels(p)},
            "commonName": c.svc_host(p),
            "dnsNames": dns_names(p),
            "duration": tls.duration,
            "renewBefore": tls.renew_before,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["server auth", "client auth", "digital signature", "key encipherment"],
            "issuerRef": issuer_ref(p),
        },
    }


def client_certificate(p: Peer) -> dict[str, Any]:
    tls = p.spec.tls
    return {
        "apiVersion": CM_API,
        "kind": "Certificate",
        "metadata": c.metadata(p, c.client_cert_name(p)),
        "spec": {
            "secretName": c.client_cert_name(p),
            "secretTemplate": {"labels": c.labels(p)},
            "commonName": f"{p.name}-client.{p.namespace}",
            "duration": tls.duration,
            "renewBefore": tls.renew_before,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["client auth", "digital signature", "key encipherment"],
            "issuerRef": issuer_ref(p),
        },
    }


def stub_names(p: Peer) -> tuple[str, ...]:
    """The Secrets a BlazenPeer owns by controller reference, whether or not TLS is on now."""
    return (c.server_cert_name(p), c.client_cert_name(p))


def secret_stub(p: Peer, name: str, *, controller: bool = True) -> dict[str, Any]:
    """An empty kubernetes.io/tls Secret created before cert-manager fills it, so that it carries our owner
    reference and is garbage-collected with the BlazenPeer (cert-manager does not set one by default)."""
    labels = c.labels(p) if controller else SHARED_LABELS
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": c.metadata(p, name, controller=controller, extra_labels=labels),
        "data": {"tls.crt": "", "tls.key": ""},
    }
