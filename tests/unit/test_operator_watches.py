"""What the operator watches, and how (#16). kopf watches BlazenPeers and BlazenFleets only; the children are
watched by the operator's own watches (watches.py), by label, server-side; never Secrets or Pods, whose
cluster-wide streams would grow with the cluster rather than with our objects. A child watch lists, then
watches from the list's resourceVersion, resumes from the last one it saw (a bookmark's included), lists again
on 410 Gone and drops what went meanwhile, keeps compact records only, and reports itself dead when the API
server has not answered it for twice the inactivity timeout."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from blazen_operator import apply, handlers, kinds, watches
from blazen_operator.apply import ApiError
from blazen_operator.cache import ChildCache
from kopf._cogs.structs.references import Resource

DEP = kinds.BY_KIND[("apps/v1", "Deployment")]
OWNER = {
    "apiVersion": "blazen.dev/v1alpha1",
    "kind": "BlazenPeer",
    "name": "bp",
    "uid": "u-1",
    "controller": True,
}


def resource(kind: kinds.ManagedKind) -> Resource:
    return Resource(
        group=kind.group, version=kind.version, plural=kind.plural, kind=kind.kind, namespaced=True
    )


def kopf_watched() -> set[tuple[str, str]]:
    registry = kopf.get_default_registry()
    out = set()
    for kind in kinds.KINDS:
        res = resource(kind)
        if registry._watching.has_handlers(res) or registry._changing.has_handlers(res):
            out.add((kind.group, kind.plural))
    return out


def test_kopf_watches_blazenpeers_and_blazenfleets_only() -> None:
    assert handlers  # imported: the handlers are registered
    assert kopf_watched() == {("blazen.dev", "blazenpeers"), ("blazen.dev", "blazenfleets")}


def test_the_child_watches_cover_the_child_kinds_and_never_secrets_or_pods() -> None:
    covered = {(k.group, k.plural) for k in kinds.WATCHED_CHILDREN}
    assert ("", "secrets") not in covered
    assert ("", "pods") not in covered
    assert ("apps", "deployments") in covered
    for kind in [*kinds.WATCHED_CHILDREN, *(k for k in kinds.KINDS if (k.group, k.plural) in kopf_watched())]:
        assert {"list", "watch"} <= kind.verbs, kind


# ---------------------------------------------------------------------------------------------- fakes


def deployment(name: str, rv: int, **status: Any) -> dict[str, Any]:
    """As a watch event carries it: everything, managedFields and a large pod template included."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "labels": {kinds.MANAGED_BY_LABEL: kinds.MANAGED_BY},
            "ownerReferences": [OWNER],
            "managedFields": [
                {
                    "manager": "blazen-operator",
                    "operation": "Apply",
                    "fieldsV1": {"f:spec": {"f:replicas": {}}},
                }
            ],
        },
        "spec": {"replicas": 2, "template": {"metadata": {}, "spec": {"containers": [{"x": "y" * 1000}]}}},
        "status": {"readyReplicas": 1, **status},
    }


def listed(obj: dict[str, Any]) -> dict[str, Any]:
    """A list item: no apiVersion/kind of its own."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


def page(items: list[dict[str, Any]], rv: int, cont: str = "") -> dict[str, Any]:
    return {"items": [listed(i) for i in items], "metadata": {"resourceVersion": str(rv), "continue": cont}}


class FakeApi:
    """Answers lists and watches from scripts; a script item that is an exception is raised. When the
    watches' script is used up the stop flag is set, so ChildWatch.run returns."""

    def __init__(self, stop: threading.Event, lists: list[Any], streams: list[Any]) -> None:
        self.stop, self.lists, self.streams = stop, lists, streams
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def request(
        self, method: str, path: str, *, query: dict[str, Any] | None = None, what: str = ""
    ) -> dict[str, Any]:
        self.calls.append(("list", {"path": path, **(query or {})}))
        item = self.lists.pop(0)
        if isinstance(item, Exception):
            raise item
        return dict(item)

    def watch(
        self,
        api_version: str,
        kind: str,
        label_selector: str,
        resource_version: str,
        *,
        server_timeout: int,
        inactivity_timeout: float,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("watch", {"labelSelector": label_selector, "resourceVersion": resource_version}))
        if not self.streams:
            self.stop.set()
            return iter(())
        item = self.streams.pop(0)
        if isinstance(item, Exception):
            raise item
        return iter(item)


def run(lists: list[Any], streams: list[Any]) -> tuple[FakeApi, ChildCache, list[dict[str, Any]]]:
    stop = threading.Event()
    api = FakeApi(stop, lists, streams)
    cache = ChildCache([("apps/v1", "Deployment")])
    changed: list[dict[str, Any]] = []
    watch = watches.ChildWatch(api, DEP, cache, changed.append, inactivity_seconds=5)
    watch.run(stop)
    return api, cache, changed


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watches, "RETRY_SECONDS", (0.0,))


def watch_rvs(api: FakeApi) -> list[str]:
    return [q["resourceVersion"] for call, q in api.calls if call == "watch"]


# ---------------------------------------------------------------------------------------------- behaviour


def test_lists_in_pages_by_label_then_watches_from_the_lists_resource_version() -> None:
    api, cache, changed = run(
        [page([deployment("a", 5)], 9, cont="tok"), page([deployment("b", 7)], 9)],
        [[{"type": "MODIFIED", "object": deployment("a", 11, readyReplicas=2)}]],
    )
    lists = [q for call, q in api.calls if call == "list"]
    assert lists[0]["labelSelector"] == kinds.MANAGED_SELECTOR
    assert lists[0]["limit"] == apply.PAGE
    assert lists[0]["path"] == "/apis/apps/v1/deployments"  # every namespace
    assert lists[1]["continue"] == "tok"
    assert watch_rvs(api)[0] == "9"
    assert {q["labelSelector"] for call, q in api.calls if call == "watch"} == {kinds.MANAGED_SELECTOR}
    assert cache.synced("apps/v1", "Deployment")
    assert cache.get("ns", "apps/v1", "Deployment", "a").obj["status"]["readyReplicas"] == 2
    assert cache.get("ns", "apps/v1", "Deployment", "b") is not None
    # the owner hears of each new record and each change
    assert [c["metadata"]["name"] for c in changed] == ["a", "b", "a"]


def test_a_watch_resumes_from_the_last_resource_version_it_saw_a_bookmarks_included() -> None:
    api, _, _ = run(
        [page([], 9)],
        [
            [{"type": "ADDED", "object": deployment("a", 12)}],  # ended by the server (timeoutSeconds)
            [{"type": "BOOKMARK", "object": {"kind": "Deployment", "metadata": {"resourceVersion": "20"}}}],
            ApiError(0, "ReadTimeoutError", "read timed out"),  # frozen: reconnect, same place
            [],
        ],
    )
    assert watch_rvs(api)[:4] == ["9", "12", "20", "20"]
    assert sum(1 for call, _ in api.calls if call == "list") == 1  # resumed, never listed again


def test_410_gone_lists_again_and_drops_what_went_meanwhile() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}
    api, cache, changed = run(
        [page([deployment("a", 5), deployment("b", 6)], 9), page([deployment("a", 5)], 30)],
        [[gone], [{"type": "MODIFIED", "object": deployment("a", 31)}]],
    )
    assert sum(1 for call, _ in api.calls if call == "list") == 2
    assert watch_rvs(api)[:2] == ["9", "30"]
    assert cache.get("ns", "apps/v1", "Deployment", "b") is None  # deleted while nobody watched
    assert cache.get("ns", "apps/v1", "Deployment", "a").resource_version == 31
    # b's owner hears that it went; a's second listing repeats what is known and wakes nobody
    assert [c["metadata"]["name"] for c in changed] == ["a", "b", "b", "a"]


def test_an_expired_continue_token_starts_the_list_over() -> None:
    api, cache, _ = run(
        [
            page([deployment("a", 5)], 9, cont="tok"),
            ApiError(410, "Gone", "continue token expired"),
            page([deployment("a", 5), deployment("b", 6)], 12),
        ],
        [],
    )
    assert [q.get("continue") for call, q in api.calls if call == "list"] == [None, "tok", None]
    assert watch_rvs(api) == ["12"]
    assert len(cache) == 2


def test_deletions_forget_the_record_and_wake_the_owner() -> None:
    _, cache, changed = run(
        [page([deployment("a", 5)], 9)], [[{"type": "DELETED", "object": deployment("a", 10)}]]
    )
    assert cache.get("ns", "apps/v1", "Deployment", "a") is None
    assert [c["metadata"]["name"] for c in changed] == ["a", "a"]


def test_the_cache_keeps_compact_records_not_the_events_objects() -> None:
    _, cache, changed = run([page([], 9)], [[{"type": "ADDED", "object": deployment("a", 10)}]])
    rec = cache.get("ns", "apps/v1", "Deployment", "a")
    assert "managedFields" not in rec.obj["metadata"]
    assert "containers" not in str(rec.obj)  # the pod template is not kept
    assert rec.ours  # what our manager owns, as a digest
    assert changed[0] is rec.obj  # the owner callback gets the record, not the event's object


def test_an_error_event_other_than_410_reconnects_from_the_same_place() -> None:
    err = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "internal"}}
    api, _, _ = run([page([], 9)], [[err], []])
    assert watch_rvs(api)[:2] == ["9", "9"]


def test_a_watch_silent_for_twice_the_inactivity_timeout_is_dead_until_it_hears_again() -> None:
    now = [100.0]
    stop = threading.Event()
    api = FakeApi(stop, [], [])
    watch = watches.ChildWatch(
        api, DEP, ChildCache(), lambda _: None, inactivity_seconds=5, clock=lambda: now[0]
    )
    group = watches.ChildWatches(api, [], ChildCache(), lambda _: None, 5)
    group.watches = [watch]
    now[0] += 9  # one frozen stream noticed and reconnecting: not dead yet
    assert watch.dead_for() == 0
    assert group.dead() == []
    now[0] += 2
    assert watch.dead_for() == pytest.approx(11)
    assert group.dead() == ["Deployment watch silent for 11s"]
    watch.alive()  # a reconnect was answered
    assert group.dead() == []


class RecordingStop(threading.Event):
    """A stop flag that records the pauses asked of it instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return self.is_set()


def test_a_stream_that_had_been_working_is_reopened_at_once_a_refused_one_backs_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watches, "RETRY_SECONDS", (1.0, 2.0, 5.0))
    ticks = iter(range(0, 10_000, 10))  # every reading of the clock: 10 s later
    stop = RecordingStop()
    timeout = ApiError(0, "ReadTimeoutError", "read timed out")
    refused = ApiError(0, "ConnectionRefusedError", "refused")

    def frozen() -> Iterator[dict[str, Any]]:  # connected, then nothing comes
        raise timeout
        yield {}

    api = FakeApi(stop, [page([], 9)], [frozen(), frozen(), refused, refused, refused, refused, frozen()])
    watch = watches.ChildWatch(
        api, DEP, ChildCache(), lambda _: None, inactivity_seconds=5, clock=lambda: float(next(ticks))
    )
    watch.run(stop)
    # the two frozen streams: reopened without a pause; then each refusal waits longer; then a frozen
    # stream (it connected) resets the backoff
    assert stop.waits == [1.0, 2.0, 5.0, 5.0]
    assert len(watch_rvs(api)) == 8
