"""cert-manager objects: the namespace CA (its generations, its Issuers, the trust ConfigMap that owns them),
the serving Certificate and the client Certificate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import spec as s
from ..kinds import MANAGED_BY, MANAGED_BY_LABEL
from . import common as c
from .common import Peer

CM_API = "cert-manager.io/v1"
CA_GENERATION_LABEL = "blazen.dev/ca-generation"
ROTATE_ANNOTATION = "blazen.dev/rotate-ca"  # set to any new value on the trust ConfigMap: rotate now
STATE_ANNOTATION = "blazen.dev/ca-rotation"  # the rotation state (rotation.Stored)
PROGRESS_ANNOTATION = "blazen.dev/ca-rotation-progress"
SETTINGS_ANNOTATION = "blazen.dev/ca-settings"  # the tls.ca in force and the BlazenPeer it came from
ISSUER_ANNOTATION = "blazen.dev/issuer"  # on a user issuer's trust ConfigMap: the issuer it follows
ISSUER_BUNDLE_LABEL = "blazen.dev/trust-bundle"  # "issuer": a user issuer's trust ConfigMap


def issuer_ref(p: Peer) -> dict[str, str]:
    ref = p.spec.tls.issuer_ref
    if ref is not None:
        return {"name": ref.name, "kind": ref.kind, "group": ref.group}
    return namespace_issuer_ref()


def namespace_issuer_ref() -> dict[str, str]:
    return {"name": c.CA_NAME, "kind": "Issuer", "group": "cert-manager.io"}


# Shared namespace objects carry no per-peer label, so pruning one peer never touches them.
SHARED_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/part-of": "blazen-fleet"}


@dataclass(frozen=True)
class CaSettings:
    """The tls.ca in force for the namespace and the BlazenPeer that set it."""

    duration: str
    renew_before: str
    source: str

    @property
    def renew_before_seconds(self) -> float:
        return s.go_duration_seconds(self.renew_before)


def ca_request(p: Peer) -> CaSettings | None:
    """The namespace CA lifetime this BlazenPeer asks for (its tls.ca); None: it does not use the namespace
    CA."""
    if not c.uses_namespace_ca(p):
        return None
    return CaSettings(p.spec.tls.ca.duration, p.spec.tls.ca.renew_before, p.name)


def strictest(a: CaSettings | None, b: CaSettings | None) -> CaSettings | None:
    """One namespace CA, many BlazenPeers: the strictest tls.ca wins, i.e. the shortest ca.duration (ties:
    the longest ca.renewBefore, then the name), taken as a pair so renewBefore < duration holds. A fold step:
    the trust pass takes the BlazenPeers one at a time and holds none of them."""
    if a is None or b is None:
        return a or b
    return min(a, b, key=_strictness)


def _strictness(x: CaSettings) -> tuple[float, float, str]:
    return (s.go_duration_seconds(x.duration), -s.go_duration_seconds(x.renew_before), x.source)


def ca_name(generation: int) -> str:
    """Name of the Certificate and Secret of one CA generation (generation 1 keeps the historical name)."""
    return c.CA_NAME if generation <= 1 else f"{c.CA_NAME}-{generation}"


def trust_configmap(namespace: str, name: str = c.TRUST_CONFIGMAP) -> dict[str, Any]:
    """A trust ConfigMap as first created. The namespace CA's (``blazen-trust``) is the root every namespace
    CA object is owned by; a user issuer's (``blazen-trust-<kind>-<issuer>``) carries the label
    ``blazen.dev/trust-bundle: issuer``. They have no owner; the operator deletes each when no BlazenPeer of
    the namespace reads it any more."""
    labels = dict(SHARED_LABELS)
    if name != c.TRUST_CONFIGMAP:
        labels[ISSUER_BUNDLE_LABEL] = "issuer"
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
    }


def trust_bundle(
    namespace: str, bundle: str, annotations: dict[str, str], name: str = c.TRUST_CONFIGMAP
) -> dict[str, Any]:
    """What the operator applies to a trust ConfigMap: the bundle (absent until the first CA is known, so
    the namespace CA's pods wait for it instead of starting with no root) and the rotation state."""
    out = trust_configmap(namespace, name)
    out["metadata"]["annotations"] = dict(annotations)
    if bundle:
        out["data"] = {c.TRUST_KEY: bundle}
    return out


def owner_reference(configmap: dict[str, Any]) -> dict[str, Any]:
    """The one owner of every namespace CA object: the trust ConfigMap (not each BlazenPeer, which grew the
    objects by one reference and one managedFields entry per peer)."""
    meta = configmap["metadata"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "name": meta["name"], "uid": meta["uid"]}


def _shared_meta(namespace: str, name: str, owner: dict[str, Any], **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {**SHARED_LABELS, **labels},
        "ownerReferences": [owner],
    }


def _backstop(settings: CaSettings) -> str:
    # cert-manager would renew a CA in place (the trap the rotation avoids); ask it to only after half of
    # the operator's own window passed, so it does so only when the operator is down that long.
    return f"{max(300, int(settings.renew_before_seconds / 2))}s"


def namespace_ca(
    namespace: str, owner: dict[str, Any], settings: CaSettings, generations: tuple[int, ...], issuing: int
) -> list[dict[str, Any]]:
    """Self-signed Issuer -> one CA Certificate per live generation -> the CA Issuer, signing with
    ``issuing``. Each CA Secret is pre-created as a stub so it has the owner too (cert-manager sets none)."""
    out: list[dict[str, Any]] = [
        {
            "apiVersion": CM_API,
            "kind": "Issuer",
            "metadata": _shared_meta(namespace, c.CA_SELFSIGNED_ISSUER, owner),
            "spec": {"selfSigned": {}},
        }
    ]
    for gen in sorted(set(generations)):
        name = ca_name(gen)
        out.append(
            {
                "apiVersion": CM_API,
                "kind": "Certificate",
                "metadata": _shared_meta(namespace, name, owner, **{CA_GENERATION_LABEL: str(gen)}),
                "spec": {
                    "isCA": True,
                    "commonName": f"{name}.{namespace}",
                    "secretName": name,
                    "duration": settings.duration,
                    "renewBefore": _backstop(settings),
                    "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                    "issuerRef": {
                        "name": c.CA_SELFSIGNED_ISSUER,
                        "kind": "Issuer",
                        "group": "cert-manager.io",
                    },
                },
            }
        )
    out.append(
        {
            "apiVersion": CM_API,
            "kind": "Issuer",
            "metadata": _shared_meta(namespace, c.CA_NAME, owner),
            "spec": {"ca": {"secretName": ca_name(issuing)}},
        }
    )
    return out


def ca_secret_stub(namespace: str, owner: dict[str, Any], generation: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": _shared_meta(namespace, ca_name(generation), owner),
        "data": {"tls.crt": "", "tls.key": ""},
    }


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


def secret_stub(p: Peer, name: str) -> dict[str, Any]:
    """An empty kubernetes.io/tls Secret created before cert-manager fills it, so that it carries our owner
    reference and is garbage-collected with the BlazenPeer (cert-manager does not set one by default)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": c.metadata(p, name),
        "data": {"tls.crt": "", "tls.key": ""},
    }
