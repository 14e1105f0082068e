"""What the operator asks kopf to watch: BlazenPeers, BlazenFleets, and only its own children (by label,
server-side); never Secrets or Pods, whose cluster-wide streams would grow with the cluster rather than with
our objects."""

from __future__ import annotations

import kopf
from blazen_operator import handlers, kinds
from kopf._cogs.structs.references import Resource


def resource(kind: kinds.ManagedKind) -> Resource:
    return Resource(
        group=kind.group, version=kind.version, plural=kind.plural, kind=kind.kind, namespaced=True
    )


def watched_resources() -> set[tuple[str, str]]:
    registry = kopf.get_default_registry()
    out = set()
    for kind in kinds.KINDS:
        res = resource(kind)
        if registry._watching.has_handlers(res) or registry._changing.has_handlers(res):
            out.add((kind.group, kind.plural))
    return out


def test_kopf_watches_blazenpeers_blazenfleets_and_the_child_kinds_only() -> None:
    assert handlers  # imported: the handlers are registered
    expected = {(k.group, k.plural) for k in kinds.WATCHED_CHILDREN}
    expected |= {("blazen.dev", "blazenpeers"), ("blazen.dev", "blazenfleets")}
    assert watched_resources() == expected
    assert ("", "secrets") not in expected
    assert ("", "pods") not in expected


def test_child_watches_ask_the_api_server_for_our_objects_only() -> None:
    settings = kopf.OperatorSettings()
    handlers.configure(settings, handlers.Options())
    for kind in kinds.KINDS:
        selectors = list(settings.watching.label_selectors.collect(resource(kind)))
        if kind in kinds.WATCHED_CHILDREN:
            assert selectors == ["app.kubernetes.io/managed-by=blazen-operator"], kind
        else:
            assert selectors == [], kind


def test_every_watched_kind_is_granted_list_and_watch() -> None:
    for kind in kinds.KINDS:
        if (kind.group, kind.plural) in watched_resources():
            assert {"list", "watch"} <= kind.verbs, kind
