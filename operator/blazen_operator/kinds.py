"""The one table of every kind the operator touches, and the verbs it uses on each.

Derived from it: the REST plural names (apply.path_for), the kinds pruned by label (reconcile), the child
kinds watched by label (watches.py), and the Helm chart's RBAC rules, generated into
``helm/blazen-operator/templates/_rules.tpl``:

    python -m blazen_operator.kinds > helm/blazen-operator/templates/_rules.tpl

The committed file must equal this output (tests/unit/test_operator_kinds.py), and the API tests run the
operator under exactly these rules (tests/api/conftest.py), so a call the table does not grant fails there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import fleet_spec, spec

# Every child carries this label; the child watches (watches.py) ask the API server for these objects only.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "blazen-operator"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"

# Objects the operator creates for a BlazenPeer: read (the ownership check), created or server-side applied
# (apply creates, so it needs `create` too).
OWNED_VERBS = frozenset({"get", "create", "patch"})
WATCH_VERBS = frozenset({"list", "watch"})
# Kinds a BlazenPeer can stop wanting (a PDB on scale-down, the NetworkPolicy turned off, ...): listed by the
# peer label and deleted.
PRUNE_VERBS = frozenset({"list", "delete"})


@dataclass(frozen=True)
class ManagedKind:
    api_version: str
    kind: str
    plural: str
    owned: bool = False  # a child: OWNED_VERBS
    watched: bool = False  # kopf (BlazenPeers, BlazenFleets) or watches.py (children, by label): WATCH_VERBS
    pruned: bool = False  # listed by the peer label and deleted when not desired: PRUNE_VERBS
    extra_verbs: frozenset[str] = frozenset()
    subresources: tuple[tuple[str, frozenset[str]], ...] = ()
    cluster_scoped: bool = False
    # held only to be granted: the operator never calls these verbs, but RBAC lets it create a Role granting
    # a permission only if it holds that permission itself (escalation prevention)
    grant_only: bool = False
    why: str = field(default="", compare=False)

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def verbs(self) -> frozenset[str]:
        out = set(self.extra_verbs)
        if self.owned:
            out |= OWNED_VERBS
        if self.watched:
            out |= WATCH_VERBS
        if self.pruned:
            out |= PRUNE_VERBS
        return frozenset(out)


def _child(api_version: str, kind: str, plural: str, *, pruned: bool = True) -> ManagedKind:
    return ManagedKind(api_version, kind, plural, owned=True, watched=True, pruned=pruned)


KINDS: tuple[ManagedKind, ...] = (
    ManagedKind(
        spec.API_VERSION,
        spec.KIND,
        spec.PLURAL,
        watched=True,
        extra_verbs=frozenset({"get", "patch", "create", "delete"}),
        subresources=(("status", frozenset({"patch"})), ("finalizers", frozenset({"update"}))),
        why="kopf watches BlazenPeers and patches its bookkeeping annotations; the operator reads each one "
        "fresh and patches status. finalizers/update: children's owner references set blockOwnerDeletion. "
        "create/delete: a BlazenFleet's pools are BlazenPeers (applied; a removed pool is deleted)",
    ),
    ManagedKind(
        spec.API_VERSION,
        fleet_spec.KIND,
        fleet_spec.PLURAL,
        watched=True,
        extra_verbs=frozenset({"get", "patch"}),
        subresources=(("status", frozenset({"patch"})), ("finalizers", frozenset({"update"}))),
        why="as BlazenPeers: kopf watches them, the operator reads each fresh and patches status; "
        "finalizers/update for the children's blockOwnerDeletion",
    ),
    ManagedKind(
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        extra_verbs=frozenset({"get", "list", "watch"}),
        grant_only=True,
        why="granted to each fleet router's Role (its pools' endpoints); never called by the operator",
    ),
    _child("rbac.authorization.k8s.io/v1", "Role", "roles"),
    _child("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    _child("v1", "ServiceAccount", "serviceaccounts"),
    # The namespace CA Issuers are owned by the trust ConfigMap: garbage collection, not pruning, removes
    # them with it.
    _child("cert-manager.io/v1", "Issuer", "issuers", pruned=False),
    ManagedKind(
        "cert-manager.io/v1",
        "Certificate",
        "certificates",
        owned=True,
        watched=True,
        pruned=True,
        subresources=(("status", frozenset({"patch"})),),
        why="leaf and namespace CA Certificates; status/patch sets the Issuing condition (as `cmctl renew` "
        "does) to re-issue every leaf during a CA rotation",
    ),
    ManagedKind(
        "v1",
        "ConfigMap",
        "configmaps",
        owned=True,
        extra_verbs=frozenset({"delete", "list"}),
        why="the trust bundles: blazen-trust, which owns the namespace CA objects and is deleted when no "
        "BlazenPeer uses the namespace CA, and blazen-trust-<kind>-<issuer> per user issuer (listed by "
        "label, never watched, to delete those no BlazenPeer reads any more)",
    ),
    # Both Services and the Deployment exist for as long as the BlazenPeer: never pruned, never deleted.
    _child("v1", "Service", "services", pruned=False),
    _child("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    _child("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    _child("apps/v1", "Deployment", "deployments", pruned=False),
    ManagedKind(
        "v1",
        "Secret",
        "secrets",
        owned=True,
        extra_verbs=frozenset({"delete"}),
        why="the TLS Secret stubs and a token-only fleet's router token (owned; created once, read, and "
        "deleted when no longer wanted, by name) and the referenced token Secret (read by name); never "
        "listed or watched",
    ),
    ManagedKind(
        "v1",
        "Pod",
        "pods",
        extra_verbs=frozenset({"list", "patch"}),
        why="the peer's pods, listed by label, to ask the ready ones which steps they serve and how many "
        "session refs they hold, patched in as their pod-deletion-cost annotation",
    ),
    ManagedKind("v1", "Event", "events", extra_verbs=frozenset({"create"}), why="Events on transitions"),
    ManagedKind(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        extra_verbs=frozenset({"get", "list", "watch"}),
        cluster_scoped=True,
        why="kopf discovers the BlazenPeer resource",
    ),
    ManagedKind(
        "v1",
        "Namespace",
        "namespaces",
        extra_verbs=frozenset({"get", "list", "watch"}),
        cluster_scoped=True,
        why="kopf and the resync loop match --namespace globs against the cluster's namespaces",
    ),
)

BY_KIND: dict[tuple[str, str], ManagedKind] = {(k.api_version, k.kind): k for k in KINDS}
PRUNABLE: tuple[tuple[str, str], ...] = tuple((k.api_version, k.kind) for k in KINDS if k.pruned)
WATCHED_CHILDREN: tuple[ManagedKind, ...] = tuple(k for k in KINDS if k.owned and k.watched)


def plural(api_version: str, kind: str) -> str:
    return BY_KIND[(api_version, kind)].plural


# ------------------------------------------------------------------------------------------------ RBAC

Rule = tuple[str, str, tuple[str, ...]]  # (apiGroup, resource, sorted verbs)


def rbac_rules(*, cluster_scoped: bool) -> list[Rule]:
    """One rule per resource (and subresource), in table order."""
    out: list[Rule] = []
    for k in KINDS:
        if k.cluster_scoped != cluster_scoped:
            continue
        out.append((k.group, k.plural, tuple(sorted(k.verbs))))
        out += [(k.group, f"{k.plural}/{sub}", tuple(sorted(verbs))) for sub, verbs in k.subresources]
    return out


def _yaml_rules(rules: Iterable[Rule]) -> list[str]:
    lines = []
    for group, resource, verbs in rules:
        lines += [
            f"- apiGroups: {json.dumps([group])}",
            f"  resources: {json.dumps([resource])}",
            f"  verbs: {json.dumps(list(verbs))}",
        ]
    return lines


def render_helm_rules() -> str:
    """The chart's _rules.tpl: the namespaced rules (a ClusterRole, or a Role per watched namespace) and the
    cluster-scoped reads kopf needs whatever the scope."""
    head = [
        "{{/*",
        "GENERATED by `python -m blazen_operator.kinds` from operator/blazen_operator/kinds.py: do not edit.",
        "The verbs are exactly those the operator uses;",
        "children are server-side applied (patch, never update).",
        "*/}}",
    ]
    lines = [*head, '{{- define "blazen-operator.namespacedRules" -}}']
    lines += _yaml_rules(rbac_rules(cluster_scoped=False))
    lines += ["{{- end }}", "", '{{- define "blazen-operator.clusterRules" -}}']
    lines += _yaml_rules(rbac_rules(cluster_scoped=True))
    lines += ["{{- end }}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    sys.stdout.write(render_helm_rules())


if __name__ == "__main__":
    main()
