"""Paged lists against the real API server (#16): more objects than a page are read whole, by continue
tokens, page by page, both by the one list mechanism (apply.Paged) and by a child watch's relist that fills
the cache from it. (An expired continue token needs a compacted etcd: tests/unit/test_operator_lists.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from blazen_operator import apply, kinds
from blazen_operator.apply import Api, path_for
from blazen_operator.cache import ChildCache
from blazen_operator.watches import ChildWatch

N = apply.PAGE + 10  # a full page and part of a second


def create_all(api: Api, manifests: list[dict[str, Any]]) -> None:
    def create(manifest: dict[str, Any]) -> None:
        meta = manifest["metadata"]
        api.request(
            "POST", path_for(manifest["apiVersion"], manifest["kind"], meta["namespace"]), body=manifest
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, manifests))


def labelled(kind: str, namespace: str, name: str, ours: bool = True) -> dict[str, Any]:
    labels = {kinds.MANAGED_BY_LABEL: kinds.MANAGED_BY} if ours else {"someone": "else"}
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
    }


def test_a_list_longer_than_a_page_is_read_whole_page_by_page(api: Api, namespace: str) -> None:
    ours = [f"cm-{i:03d}" for i in range(N)]
    create_all(
        api,
        [labelled("ConfigMap", namespace, n) for n in ours]
        + [labelled("ConfigMap", namespace, f"other-{i}", ours=False) for i in range(3)],
    )
    paged = api.each("v1", "ConfigMap", namespace, kinds.MANAGED_SELECTOR)
    names = paged.keep(lambda obj: (obj["kind"], obj["metadata"]["name"]))
    assert sorted(names) == [("ConfigMap", n) for n in ours]  # each once, the unlabelled ones not at all
    assert paged.pages == 2
    assert int(paged.resource_version) > 0
    listing = api.collect("v1", "ConfigMap", namespace, kinds.MANAGED_SELECTOR)
    assert len(listing.items) == N
    assert listing.resource_version


def test_a_child_watch_relist_longer_than_a_page_fills_the_cache(api: Api, namespace: str) -> None:
    names = [f"sa-{i:03d}" for i in range(N)]
    create_all(api, [labelled("ServiceAccount", namespace, n) for n in names])
    cache = ChildCache([("v1", "ServiceAccount")])
    watch = ChildWatch(
        Api(api.configuration),
        kinds.BY_KIND[("v1", "ServiceAccount")],
        cache,
        lambda _: None,
        inactivity_seconds=5,
    )
    watch.relist()
    assert cache.synced("v1", "ServiceAccount")
    missing = [n for n in names if cache.get(namespace, "v1", "ServiceAccount", n) is None]
    assert missing == []
    assert watch.resource_version
