"""The operator's child watches (watches.py) against the real API server (#16): a labelled child's creation,
change and deletion reach the cache and wake its owners, unlabelled objects never arrive, and a watch whose
connection freezes is reconnected, reported dead while the API cannot be reached, and alive again, with
nothing lost, once it can. (A 410 Gone is tests/unit/test_operator_watches.py's: a young API server's watch
cache still holds every resourceVersion, so none expires here.)
(That the operator's pass follows a child's change is tests/api/test_operator_api.py's drift test; with the
level-based resync out of the way, tests/scale/test_watch_stall.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from blazen_operator import kinds
from blazen_operator.apply import Api, load_client_configuration, path_for
from blazen_operator.cache import ChildCache
from blazen_operator.watches import ChildWatches

from tests.support.controlplane import eventually
from tests.support.tcpproxy import FreezableProxy

SA = kinds.BY_KIND[("v1", "ServiceAccount")]
INACTIVITY = 2.0


class Seen:
    """What the watches told the owners: (namespace, name) of each child whose record moved or went."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: list[tuple[str, str]] = []

    def __call__(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.names.append((obj["metadata"]["namespace"], obj["metadata"]["name"]))

    def count(self, namespace: str, name: str) -> int:
        with self.lock:
            return self.names.count((namespace, name))


def service_account(namespace: str, name: str, labelled: bool = True) -> dict[str, Any]:
    labels = {kinds.MANAGED_BY_LABEL: kinds.MANAGED_BY} if labelled else {"someone": "else"}
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
    }


@pytest.fixture
def watched(api: Api) -> Iterator[tuple[ChildWatches, ChildCache, Seen]]:
    cache, seen = ChildCache([("v1", "ServiceAccount")]), Seen()
    group = ChildWatches(Api(api.configuration), [SA], cache, seen, INACTIVITY)
    group.start()
    try:
        yield group, cache, seen
    finally:
        group.stop()


def test_a_labelled_childs_changes_reach_the_cache_and_its_owner(api, namespace, watched):
    group, cache, seen = watched
    eventually(lambda: cache.synced("v1", "ServiceAccount"), what="the first list")
    api.request("POST", path_for("v1", "ServiceAccount", namespace), body=service_account(namespace, "ours"))
    api.request(
        "POST", path_for("v1", "ServiceAccount", namespace), body=service_account(namespace, "theirs", False)
    )
    rec = eventually(lambda: cache.get(namespace, "v1", "ServiceAccount", "ours"), what="the created child")
    assert "managedFields" not in rec.obj["metadata"]
    assert seen.count(namespace, "ours") == 1

    changed = api.request(
        "PATCH",
        path_for("v1", "ServiceAccount", namespace, "ours"),
        body={"metadata": {"annotations": {"x": "y"}}},
        content_type="application/merge-patch+json",
    )
    eventually(
        lambda: (
            cache.get(namespace, "v1", "ServiceAccount", "ours").resource_version
            == int(changed["metadata"]["resourceVersion"])
        ),
        what="the change",
    )
    assert seen.count(namespace, "ours") == 2

    api.delete("v1", "ServiceAccount", namespace, "ours")
    eventually(lambda: cache.get(namespace, "v1", "ServiceAccount", "ours") is None, what="the deletion")
    assert seen.count(namespace, "ours") == 3
    assert cache.get(namespace, "v1", "ServiceAccount", "theirs") is None  # never sent: not our label
    assert seen.count(namespace, "theirs") == 0
    assert group.dead() == []


@pytest.mark.timeout(120)
def test_a_frozen_watch_reconnects_is_dead_while_unreachable_and_loses_nothing(
    api, namespace, control_plane, tmp_path
):
    proxy = FreezableProxy(control_plane.apiserver_port)
    # a kubeconfig of its own: the kubeconfig loader puts its server back into a configuration on each call
    config = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    cache, seen = ChildCache([("v1", "ServiceAccount")]), Seen()
    group = ChildWatches(
        Api(load_client_configuration(str(tmp_path / "kubeconfig"))), [SA], cache, seen, INACTIVITY
    )
    (watch,) = group.watches
    group.start()
    try:
        api.request("POST", path_for("v1", "ServiceAccount", namespace), body=service_account(namespace, "a"))
        eventually(lambda: cache.get(namespace, "v1", "ServiceAccount", "a"), what="a, through the watch")
        accepted = proxy.accepted

        # frozen, and so is every new connection: the watch reconnects, gets nothing back, and is dead
        proxy.freeze(hold_new=True)
        api.request("POST", path_for("v1", "ServiceAccount", namespace), body=service_account(namespace, "b"))
        dead = eventually(group.dead, timeout=6 * INACTIVITY, what="the frozen watch reported dead")
        assert dead[0].startswith("ServiceAccount watch silent for ")
        assert proxy.accepted > accepted  # it noticed and tried again
        assert cache.get(namespace, "v1", "ServiceAccount", "b") is None

        proxy.release()
        eventually(lambda: cache.get(namespace, "v1", "ServiceAccount", "b"), timeout=30, what="the change")
        assert group.dead() == []
        assert watch.lists == 1  # resumed where it stopped, not listed again
    finally:
        group.stop()
        proxy.close()
