"""Watch health (#16.4): a watch stream that freezes (the connection stays open, nothing moves: a dropped NAT
entry, a hung proxy) is noticed by the operator within --watch-inactivity-seconds and reconnected from its
last resourceVersion, so changes made while it was frozen are reconciled: kopf's watches of BlazenPeers and
the operator's own child watches (watches.py). While the API server cannot be reached at all, the liveness
probe fails (a child watch silent for twice the inactivity timeout), and recovers once it can. The
level-based resync is set to an hour so that only the watches can deliver the changes."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

import pytest
from blazen_operator import spec as s
from blazen_operator.apply import path_for

from bench import operator as bench
from tests.support.controlplane import eventually
from tests.support.tcpproxy import FreezableProxy

NS = bench.BENCH_NS
INACTIVITY = 5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with bench.ScaleCluster.start(tmp_path_factory.mktemp("stall"), resync_seconds=None) as sc:
        yield sc


def _peer(sc, name):
    return sc.admin.get(s.API_VERSION, s.KIND, NS, name)


def _healthz(sc) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sc.operator_liveness_port}/healthz", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _replicas(sc, name):
    return sc.admin.get("apps/v1", "Deployment", NS, name)["spec"]["replicas"]


def _reconciled(sc, name, replicas):
    """The Deployment carries the current spec and the status reflects the current generation, Ready."""
    peer = _peer(sc, name)
    dep = sc.admin.get("apps/v1", "Deployment", NS, name)
    status = peer.get("status") or {}
    return (
        dep is not None
        and dep["spec"]["replicas"] == replicas
        and status.get("observedGeneration") == peer["metadata"]["generation"]
        and bench.is_ready(peer)
    )


@pytest.mark.timeout(600)
def test_frozen_watches_are_reconnected_and_no_change_is_lost(cluster):
    proxy = FreezableProxy(cluster.cp.apiserver_port)
    try:
        cluster.start_operator(
            3600,
            server=f"https://127.0.0.1:{proxy.port}",
            extra_args=(f"--watch-inactivity-seconds={INACTIVITY}",),
        )
        create = path_for(s.API_VERSION, s.KIND, NS)
        port = cluster.admin_port
        cluster.admin.request("POST", create, body=bench.peer_manifest("stall-a", NS, False, port))
        eventually(lambda: _reconciled(cluster, "stall-a", 2), timeout=120, what="stall-a Ready")

        frozen = proxy.freeze()
        assert frozen > 0  # the operator's watches and pooled connections, all stalled now
        accepted = proxy.accepted
        frozen_at = time.monotonic()

        # Changes while every connection the operator had is frozen: a new peer, and a spec change.
        cluster.admin.request("POST", create, body=bench.peer_manifest("stall-b", NS, True, port))
        cluster.admin.request(
            "PATCH",
            path_for(s.API_VERSION, s.KIND, NS, "stall-a"),
            body={"spec": {"replicas": 3}},
            content_type="application/merge-patch+json",
        )

        eventually(lambda: _reconciled(cluster, "stall-b", 2), timeout=180, what="stall-b reconciled")
        eventually(lambda: _reconciled(cluster, "stall-a", 3), timeout=180, what="stall-a's change")
        assert proxy.accepted > accepted  # it came back through new connections, not the frozen ones
        print(f"reconciled {time.monotonic() - frozen_at:.1f}s after the freeze", file=sys.stderr)

        # Now a black hole: every connection, new ones too, connects and gets nothing back. A child is
        # changed by hand meanwhile (only the child watch can tell the operator: nothing changes the
        # BlazenPeer). The probe fails while the watches cannot reach the API server...
        assert _healthz(cluster) == 200
        proxy.freeze(hold_new=True)
        cluster.admin.request(
            "PATCH",
            path_for("apps/v1", "Deployment", NS, "stall-a"),
            body={"spec": {"replicas": 1}},
            content_type="application/merge-patch+json",
        )
        eventually(lambda: _healthz(cluster) == 500, timeout=10 * INACTIVITY + 30, what="liveness fails")
        assert _replicas(cluster, "stall-a") == 1  # nobody got through to revert it
        # ... and passes again once they can; the change made in the dark is reverted
        proxy.release()
        eventually(lambda: _healthz(cluster) == 200, timeout=120, what="liveness recovers")
        eventually(lambda: _replicas(cluster, "stall-a") == 3, timeout=180, what="the drift reverted")
    finally:
        proxy.close()
