"""Secret stubs (create-only children, never watched): the operator reads them again at most, and at least,
once per ``recheck_seconds``, so that a stub's labels edited by hand come back however often passes run."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
from blazen_operator import reconcile
from blazen_operator.builders import Child
from blazen_operator.cache import ChildCache

NS = "ns"
LABELS = {"blazen.dev/fleet": "demo"}
OWNER_REF = {"apiVersion": "blazen.dev/v1alpha1", "kind": "BlazenFleet", "name": "demo", "uid": "u-1"}


@dataclass(frozen=True)
class _Owner:
    name: str = "demo"
    namespace: str = NS
    uid: str = "u-1"


class _Api:
    """The stub on a fake API server: counts the reads, applies metadata."""

    def __init__(self) -> None:
        self.secret: dict[str, Any] | None = None
        self.reads = 0

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return copy.deepcopy(self.secret)

    def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        self.secret = copy.deepcopy(manifest)
        return copy.deepcopy(self.secret)

    def apply(self, manifest: dict[str, Any], manager: str) -> dict[str, Any]:
        assert self.secret is not None
        self.secret["metadata"].update(copy.deepcopy(manifest["metadata"]))
        return copy.deepcopy(self.secret)


def test_a_stub_edited_by_hand_is_put_back_though_passes_come_faster_than_the_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(reconcile.time, "monotonic", lambda: now[0])
    stub = Child(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "demo-router-tls",
                "namespace": NS,
                "labels": LABELS,
                "ownerReferences": [OWNER_REF],
            },
            "type": "kubernetes.io/tls",
        },
        create_only=True,
    )
    api = _Api()
    applier = reconcile.ChildApplier(api, ChildCache(), recheck_seconds=3.0)  # type: ignore[arg-type]
    memory = reconcile.ChildMemory(uid="u-1")

    def one_pass() -> None:
        live = {stub.key: applier.live(_Owner(), stub, [stub], memory)}
        applier.apply(_Owner(), stub, [stub], live, memory)

    one_pass()
    assert api.secret is not None
    assert api.reads == 1
    # someone removes our label; passes then come every 2 s (the resync, events of other children)
    del api.secret["metadata"]["labels"]["blazen.dev/fleet"]
    for _ in range(3):
        now[0] += 2.0
        one_pass()
    assert api.reads >= 2, "the stub was never read again: passes faster than the recheck hid the drift"
    assert api.secret["metadata"]["labels"] == LABELS
    # and not read on every pass either: at most once per recheck_seconds
    reads = api.reads
    for _ in range(3):
        now[0] += 1.0
        one_pass()
    assert api.reads - reads <= 1
