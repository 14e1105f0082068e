"""The operator scale benchmark at N=100 (bench/operator.py) as a correctness test: every BlazenPeer Ready, no
Warning Events, no operator traceback, and a resync of the unchanged objects writes nothing. Times are
recorded by the benchmark (`make bench-operator`, docs/benchmarks.md), not asserted here."""

from __future__ import annotations

import json
import sys

import pytest

from bench import operator as bench


@pytest.mark.timeout(1500)
def test_hundred_blazenpeers_reconcile_to_ready_and_a_resync_changes_nothing(tmp_path):
    result = bench.run(100, tmp_path / "n100", resync_seconds=120, ready_timeout=900)
    print(json.dumps(result), file=sys.stderr)

    assert result["children_complete"] == 100
    assert result["ready_count"] == 100
    # No Warning Event, except cert-manager's complaint while the namespace CA bootstraps: the operator
    # creates the CA's Secret stub (to carry owner references) before cert-manager has issued into it, and
    # the CA Issuer reports the empty Secret until it is filled (docs/benchmarks.md).
    bootstrap = {"ErrGetKeyPair", "ErrInitIssuer"}
    ca_issuer = "cert-manager-issuers: Issuer/blazen-ca: "
    others = {
        key: count
        for key, count in result["warning_events"].items()
        if not (key.startswith(ca_issuer) and key.split(": ")[2] in bootstrap)
    }
    assert others == {}
    assert result["operator_log_tracebacks"] == 0
    # a resync of unchanged objects moves no resourceVersion: no BlazenPeer status, child or Event is written
    assert result["resync_changed_objects"] == [], result["resync_changed_objects"][:20]
    # ... and sends no write request at all (not even a server-side apply the API server finds a no-op)
    assert result["resync_write_requests"] == 0, result["resync_operator_requests"]
    assert result["resync_peers"] > 100
