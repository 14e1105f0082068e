"""Every list the operator makes is paged (apply.Paged, #16): ``limit`` objects a request following
``continue`` tokens, so no list of 1,000 BlazenPeers' objects is decoded at once; an expired token (410 Gone)
starts the list over and tells the caller, who drops what it kept of the first attempt. What the callers keep
of each object is small: keys for the resync, a few fields of Certificates and pods for the trust pass."""

from __future__ import annotations

from typing import Any

import pytest
from blazen_operator import apply, handlers, kinds, watches
from blazen_operator.apply import ApiError, Paged
from blazen_operator.cache import ChildCache
from blazen_operator.trust import CertRecord, PodRecord, Trust

from tests.support.kube_fake import Cluster


def item(name: str) -> dict[str, Any]:
    labels = {kinds.MANAGED_BY_LABEL: kinds.MANAGED_BY}
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": "1", "labels": labels}}


class Pages:
    """An API server's list answers from a script: each entry a page (items, continue token, rv) or an
    exception to raise."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.queries: list[dict[str, Any]] = []

    def __call__(
        self, method: str, path: str, *, query: dict[str, Any] | None = None, what: str = ""
    ) -> dict[str, Any]:
        assert method == "GET"
        self.queries.append({"path": path, **(query or {})})
        entry = self.script.pop(0)
        if isinstance(entry, Exception):
            raise entry
        names, token, rv = entry
        return {"items": [item(n) for n in names], "metadata": {"continue": token, "resourceVersion": rv}}


GONE = ApiError(410, "Gone", "The provided continue parameter is too old")


def test_a_list_follows_continue_tokens_a_page_at_a_time() -> None:
    request = Pages((["a", "b"], "t1", "7"), (["c"], "", "9"))
    paged = Paged(request, "apps/v1", "Deployment", "ns", "x=y")
    seen = []
    for obj in paged:
        # one page decoded at a time: the second is asked for only after the first is handed out
        seen.append((obj["metadata"]["name"], len(request.queries)))
        assert (obj["apiVersion"], obj["kind"]) == ("apps/v1", "Deployment")
    assert seen == [("a", 1), ("b", 1), ("c", 2)]
    assert request.queries == [
        {"path": "/apis/apps/v1/namespaces/ns/deployments", "limit": apply.PAGE, "labelSelector": "x=y"},
        {
            "path": "/apis/apps/v1/namespaces/ns/deployments",
            "limit": apply.PAGE,
            "labelSelector": "x=y",
            "continue": "t1",
        },
    ]
    assert paged.resource_version == "9"


def test_an_expired_continue_token_starts_over_and_tells_the_caller() -> None:
    request = Pages((["a", "b"], "t1", "7"), GONE, (["a", "b"], "t2", "12"), (["c"], "", "12"))
    told: list[int] = []
    kept: list[str] = []

    def restarted() -> None:
        told.append(len(kept))
        kept.clear()

    paged = Paged(request, "v1", "Pod", "ns", restarted=restarted)
    for obj in paged:
        kept.append(obj["metadata"]["name"])
    assert told == [2]  # told once, after the first page, before its items come again
    assert kept == ["a", "b", "c"]
    assert "continue" not in request.queries[2]
    assert paged.resource_version == "12"


def test_keep_drops_what_it_kept_when_the_list_starts_over() -> None:
    request = Pages((["a", "b"], "t1", "7"), GONE, (["a", "b", "c"], "", "12"))
    told: list[bool] = []
    paged = Paged(request, "v1", "Pod", "ns", restarted=lambda: told.append(True))
    assert paged.keep(lambda o: o["metadata"]["name"]) == ["a", "b", "c"]
    assert told == [True], "the caller's own restarted is still told"


def test_a_gone_first_page_is_an_error_not_a_loop() -> None:
    with pytest.raises(ApiError):
        list(Paged(Pages(GONE), "v1", "Pod", "ns"))


def test_a_child_watch_relist_that_starts_over_drops_nothing_it_should_keep() -> None:
    """Records the first attempt saw are not taken as 'still there' by the second: the restart resets the
    set of keys the relist keeps."""
    cache = ChildCache([("apps/v1", "Deployment")])
    cache.observe({**item("gone"), "apiVersion": "apps/v1", "kind": "Deployment"})
    assert cache.get("ns", "apps/v1", "Deployment", "gone") is not None

    class Api:
        request = Pages((["gone", "a"], "t1", "7"), GONE, (["a"], "t2", "8"), (["b"], "", "8"))

    watch = watches.ChildWatch(
        Api(), kinds.BY_KIND[("apps/v1", "Deployment")], cache, lambda _: None, inactivity_seconds=5
    )
    watch.relist()
    assert cache.get("ns", "apps/v1", "Deployment", "gone") is None
    assert cache.get("ns", "apps/v1", "Deployment", "a") is not None
    assert watch.resource_version == "8"


def test_the_resync_keeps_keys_of_every_page_once() -> None:
    peers = [{"metadata": {"name": f"p{i}", "namespace": "ns"}} for i in range(5)]
    api = Cluster(peers)
    assert handlers.list_peers(api, ("ns",)) == [("ns", f"p{i}") for i in range(5)]  # type: ignore[arg-type]
    continued = [q for kind, q in api.pages if q.get("continue")]
    assert continued, "more peers than a page: listed by continue tokens"
    assert all(q["limit"] == apply.PAGE for _, q in api.pages)  # asked for; the fake serves two


def test_the_trust_pass_reads_every_peer_of_a_list_that_started_over() -> None:
    """Five BlazenPeers, two a page, the first continue token expired: the pass sees each once."""
    peers = [
        {
            "metadata": {"name": f"p{i}", "namespace": "ns", "uid": f"u{i}"},
            "spec": {"image": "i", "entrypoint": "m"},
        }
        for i in range(5)
    ]
    api = Cluster(peers)
    view = Trust(api).sync("ns")  # type: ignore[arg-type]
    assert view is not None
    assert sorted(view.readers) == [f"p{i}" for i in range(5)]
    assert not api.expire_first_token, "the expired token was met"


def test_a_certificate_is_kept_as_the_fields_the_trust_pass_reads() -> None:
    cert = {
        "metadata": {
            "name": "bp-tls",
            "uid": "c-1",
            "labels": {"blazen.dev/ca-generation": "2"},
            "managedFields": [{"manager": "cert-manager", "fieldsV1": {"f:status": {}}}] * 20,
        },
        "spec": {
            "secretName": "bp-tls",
            "issuerRef": {"name": "blazen-ca"},
            "dnsNames": [f"bp-{i}.ns.svc" for i in range(50)],
        },
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "Issuing", "status": "False"}],
            "revision": 3,
            "notBefore": "2026-01-01T00:00:00Z",
            "notAfter": "2026-04-01T00:00:00Z",
        },
    }
    kept = CertRecord.of(cert)
    assert kept == CertRecord(
        name="bp-tls",
        uid="c-1",
        generation=kept.generation,
        is_ca=False,
        secret_name="bp-tls",
        issuer=("blazen-ca", "Issuer", "cert-manager.io"),  # cert-manager's defaults filled in
        ready=True,
        issuing=False,
        revision=3,
        not_before="2026-01-01T00:00:00Z",
        not_after="2026-04-01T00:00:00Z",
    )
    assert not hasattr(kept, "__dict__"), "slots: no per-record dict"


def pod(
    name: str, *, ready: bool = True, deleting: bool = False, ip: str | None = "10.0.0.1"
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/instance": "bp"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {
            "volumes": [
                {"name": "trust", "configMap": {"name": "blazen-trust"}},
                {"name": "x", "emptyDir": {}},
            ],
            "containers": [{"name": "peer", "ports": [{"name": "admin", "containerPort": 9090}]}],
        },
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_a_pod_is_kept_as_its_owner_bundles_and_info_address() -> None:
    assert PodRecord.of(pod("bp-0")) == PodRecord(
        "bp-0", "bp", frozenset({"blazen-trust"}), "http://10.0.0.1:9090/v1/info"
    )
    # a pod that cannot be asked: no address, so the rotation does not wait on an answer it cannot get
    assert PodRecord.of(pod("bp-1", ready=False)).url is None
    assert PodRecord.of(pod("bp-2", deleting=True)).url is None
    assert PodRecord.of(pod("bp-3", ip=None)).url is None
