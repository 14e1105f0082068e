"""Pure builders: a BlazenPeer (as a :class:`Peer`) -> the manifests of its children.

``desired(peer)`` is what the handlers apply and what ``blazen-operator render`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import certs, common, fleet, router, workload
from .common import Peer
from .fleet import Fleet

__all__ = [
    "Child",
    "Fleet",
    "Peer",
    "certs",
    "common",
    "desired",
    "fleet",
    "router",
    "router_desired",
    "workload",
]


@dataclass(frozen=True)
class Child:
    """One child object and how to apply it.

    ``create_only``: created when absent and never overwritten (Secret stubs that cert-manager fills in); the
    operator then applies only their metadata. The namespace CA is not a child of any BlazenPeer: the
    ``trust`` module keeps it, owned by the trust ConfigMap.
    """

    manifest: dict[str, Any]
    create_only: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        m = self.manifest
        return (m["apiVersion"], m["kind"], m["metadata"]["name"])


def desired(p: Peer) -> list[Child]:
    """Every child of the BlazenPeer, in apply order (identity and certificates before the pods use them)."""
    out: list[Child] = [Child(m) for m in workload.rbac(p)]
    if p.spec.tls.enabled:
        out.append(Child(certs.secret_stub(p, common.server_cert_name(p)), create_only=True))
        out.append(Child(certs.secret_stub(p, common.client_cert_name(p)), create_only=True))
        out.append(Child(certs.server_certificate(p)))
        out.append(Child(certs.client_certificate(p)))
    out.append(Child(workload.service(p)))
    out.append(Child(workload.headless_service(p)))
    for optional in (workload.pod_disruption_budget(p), workload.network_policy(p)):
        if optional is not None:
            out.append(Child(optional))
    out.append(Child(workload.deployment(p)))
    return out


def router_desired(f: Fleet) -> list[Child]:
    """Every child of a BlazenFleet's router, in apply order (identity and certificate before the pods use
    them). The pools' BlazenPeers are applied apart: the fleet writes their replicas by its own rule
    (builders.fleet.replicas_due)."""
    out: list[Child] = [Child(m) for m in router.rbac(f)]
    if f.spec.tls.enabled:
        out += [Child(router.secret_stub(f), create_only=True), Child(router.certificate(f))]
    out.append(Child(router.service(f)))
    for optional in (router.pod_disruption_budget(f), router.network_policy(f)):
        if optional is not None:
            out.append(Child(optional))
    out.append(Child(router.deployment(f)))
    return out
