"""status.compute is a pure function of the observed objects: table-driven tests, no API."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from blazen_operator import status
from blazen_operator.builders import Peer, common, workload
from blazen_operator.spec import parse_spec

T0 = dt.datetime(2026, 11, 22, 4, 0, 0, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)


def peer(**spec: Any) -> Peer:
    return Peer(name="bp", namespace="ns", spec=parse_spec({"image": "i", "entrypoint": "m", **spec}))


def deployment(replicas=2, ready=2, updated=2, available=None, gen=1, observed_gen=1, conditions=None):
    available = ready if available is None else available
    conds = conditions
    if conds is None:
        conds = [
            {"type": "Available", "status": "True" if available else "False", "reason": "x"},
            {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
        ]
    return {
        "metadata": {"generation": gen},
        "status": {
            "observedGeneration": observed_gen,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": conds,
        },
    }


def observed(**kw: Any) -> status.Observed:
    """An Observed whose Deployment carries the peer's current template (the config-hash annotation),
    unless the test gave it a template of its own."""
    dep, p = kw.get("deployment"), kw.get("peer")
    if dep is not None and p is not None and "spec" not in dep:
        annotations = {common.CONFIG_HASH_ANNOTATION: workload.config_hash(p)}
        kw["deployment"] = {**dep, "spec": {"template": {"metadata": {"annotations": annotations}}}}
    return status.Observed(**kw)


def certificate(ready="True", gen=1, cond_gen=1, reason="Ready", message="ok"):
    return {
        "metadata": {"generation": gen},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": ready,
                    "reason": reason,
                    "message": message,
                    "observedGeneration": cond_gen,
                }
            ],
            "notAfter": "2027-01-01T00:00:00Z",
            "renewalTime": "2026-12-01T00:00:00Z",
        },
    }


def conds(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body["conditions"]}


@pytest.mark.parametrize(
    ("observed", "phase", "expected"),
    [
        pytest.param(
            observed(generation=1, peer=peer(replicas=2), deployment=deployment(), certificate=certificate()),
            "Ready",
            {
                "Ready": ("True", "AllPodsReady"),
                "Available": ("True", "MinimumReplicasAvailable"),
                "Progressing": ("False", "RolloutComplete"),
                "CertificateReady": ("True", "CertificateIssued"),
                "Degraded": ("False", "AsExpected"),
            },
            id="all-ready",
        ),
        pytest.param(
            observed(generation=1, peer=peer(replicas=2)),
            "Pending",
            {
                "Ready": ("False", "DeploymentMissing"),
                "Available": ("False", "DeploymentMissing"),
                "CertificateReady": ("False", "CertificateMissing"),
            },
            id="nothing-yet",
        ),
        pytest.param(
            observed(
                generation=2,
                peer=peer(replicas=2),
                deployment=deployment(ready=1, updated=1, available=1),
                certificate=certificate(),
            ),
            "Progressing",
            {"Ready": ("False", "PodsNotReady"), "Progressing": ("True", "RollingOut")},
            id="rolling",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(replicas=2),
                deployment=deployment(),
                certificate=certificate(cond_gen=0, gen=1),
            ),
            "Progressing",
            {
                "CertificateReady": ("False", "CertificateReissuing"),
                "Ready": ("False", "CertificateNotReady"),
            },
            id="cert-condition-stale",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(replicas=2),
                deployment=deployment(),
                certificate=certificate(ready="False", reason="Failed", message="issuer failed"),
            ),
            "Degraded",
            {"CertificateReady": ("False", "CertificateFailed"), "Degraded": ("True", "CertificateFailed")},
            id="cert-failed",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(replicas=1, tls={"enabled": False}, auth={"tokenSecretRef": {"name": "t"}}),
                deployment=deployment(replicas=1, ready=1, updated=1),
            ),
            "Ready",
            {"CertificateReady": ("True", "TLSDisabled"), "Ready": ("True", "AllPodsReady")},
            id="tls-off",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(replicas=2),
                deployment=deployment(
                    ready=0,
                    updated=2,
                    conditions=[
                        {
                            "type": "Progressing",
                            "status": "False",
                            "reason": "ProgressDeadlineExceeded",
                            "message": "m",
                        }
                    ],
                ),
                certificate=certificate(),
            ),
            "Degraded",
            {
                "Progressing": ("False", "ProgressDeadlineExceeded"),
                "Degraded": ("True", "ProgressDeadlineExceeded"),
            },
            id="deadline",
        ),
        pytest.param(
            observed(generation=3, peer=None, invalid="spec.image: Field required"),
            "Invalid",
            {"Ready": ("False", "InvalidSpec"), "Degraded": ("True", "InvalidSpec")},
            id="invalid",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(replicas=0),
                deployment=deployment(replicas=0, ready=0, updated=0),
                certificate=certificate(),
            ),
            "Ready",
            {"Ready": ("True", "ScaledToZero"), "Available": ("True", "ScaledToZero")},
            id="scaled-to-zero",
        ),
        pytest.param(
            observed(
                generation=1,
                peer=peer(),
                apply_error="Deployment bp: invalid affinity",
                deployment=deployment(replicas=1, ready=1, updated=1),
                certificate=certificate(),
            ),
            "Degraded",
            {"Degraded": ("True", "ApplyFailed"), "Ready": ("False", "ApplyFailed")},
            id="apply-failed",
        ),
    ],
)
def test_conditions_and_phase(observed, phase, expected):
    out = status.compute(observed, now=T0)
    assert out["phase"] == phase
    got = conds(out)
    for type_, value in expected.items():
        assert got[type_] == value, type_
    assert out["observedGeneration"] == observed.generation
    assert all(c["observedGeneration"] == observed.generation for c in out["conditions"])


def test_replica_counts_selector_endpoints_and_certificate():
    out = status.compute(
        observed(
            generation=1,
            peer=peer(replicas=3, plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {}}]}),
            deployment=deployment(replicas=3, ready=1, updated=3),
            certificate=certificate(),
        ),
        now=T0,
    )
    assert (out["replicas"], out["readyReplicas"], out["updatedReplicas"]) == (3, 1, 3)
    assert out["selector"] == "app.kubernetes.io/instance=bp,app.kubernetes.io/name=blazen-peer"
    assert out["endpoints"] == {
        "grpc": "bp.ns.svc:50051",
        "http": "https://bp.ns.svc:8080",
        "plaintextGrpc": "bp.ns.svc:50052",
        "headless": "bp-peers.ns.svc",
    }
    assert out["certificate"]["notAfter"] == "2027-01-01T00:00:00Z"
    assert out["certificate"]["renewalTime"] == "2026-12-01T00:00:00Z"
    assert out["certificate"]["clientSecretName"] == "bp-client-tls"


@pytest.mark.parametrize(
    ("pods", "served", "unknown"),
    [
        ((), None, None),
        ((status.PodReport("a", ready=False, info=None),), None, None),
        ((status.PodReport("a", ready=True, info=None),), None, 1),
        ((status.PodReport("a", ready=True, info={"steps": ["x", "y"]}),), ["x", "y"], 0),
        (
            (
                status.PodReport("a", ready=True, info={"steps": ["y"]}),
                status.PodReport("b", ready=True, info={"steps": ["x"]}),
                status.PodReport("c", ready=True, info=None),
                status.PodReport("d", ready=False, info={"steps": ["never-counted"]}),
            ),
            ["x", "y"],
            1,
        ),
    ],
)
def test_served_steps_are_reported_never_invented(pods, served, unknown):
    out = status.compute(observed(generation=1, peer=peer(), deployment=deployment(), pods=pods), now=T0)
    assert out.get("servedSteps") == served
    assert out.get("stepsUnknownPods") == unknown


def test_steps_not_served_is_degraded():
    pods = (status.PodReport("a", ready=True, info={"steps": ["a::x"]}),)
    out = status.compute(
        observed(generation=1, peer=peer(steps=["a::x", "a::y"]), deployment=deployment(), pods=pods),
        now=T0,
    )
    assert conds(out)["Degraded"] == ("True", "StepsNotServed")
    assert "a::y" in next(c for c in out["conditions"] if c["type"] == "Degraded")["message"]


def test_last_transition_time_moves_only_on_change():
    half = observed(
        generation=1, peer=peer(replicas=2), deployment=deployment(ready=1), certificate=certificate()
    )
    first = status.compute(half, now=T0)
    again = status.compute(half, previous=first, now=T1)
    assert again == first, "same observation, same status: nothing to write"

    ready = observed(generation=1, peer=peer(replicas=2), deployment=deployment(), certificate=certificate())
    second = status.compute(ready, previous=first, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == "2026-11-22T04:05:00Z"
    assert times["CertificateReady"] == "2026-11-22T04:00:00Z"
    assert times["Degraded"] == "2026-11-22T04:00:00Z"


def test_transitions_produce_events():
    pending = status.compute(observed(generation=1, peer=peer(), deployment=deployment(ready=0)), now=T0)
    assert status.transitions({}, pending) == []
    issued = status.compute(
        observed(generation=1, peer=peer(replicas=2), deployment=deployment(), certificate=certificate()),
        previous=pending,
        now=T1,
    )
    reasons = [(e.type, e.reason) for e in status.transitions(pending, issued)]
    assert ("Normal", "CertificateIssued") in reasons
    assert ("Normal", "Ready") in reasons
    broken = status.compute(observed(generation=2, peer=None, invalid="bad"), previous=issued, now=T1)
    reasons = [(e.type, e.reason) for e in status.transitions(issued, broken)]
    assert ("Warning", "InvalidSpec") in reasons
    assert status.transitions(broken, broken) == []


def test_invalid_spec_keeps_what_is_known():
    good = status.compute(
        observed(generation=1, peer=peer(replicas=2), deployment=deployment(), certificate=certificate()),
        now=T0,
    )
    bad = status.compute(observed(generation=2, peer=None, invalid="bad"), previous=good, now=T1)
    assert bad["replicas"] == 2
    assert bad["endpoints"] == good["endpoints"]
    assert bad["observedGeneration"] == 2


def test_not_ready_until_the_current_template_serves():
    """A Deployment still on the previous template (a stale read, or the rollout not started) with every old
    pod ready is not Ready: Available says the previous pods serve, Progressing says rolling out."""
    p = peer(replicas=2)
    stale = {
        **deployment(),
        "spec": {"template": {"metadata": {"annotations": {common.CONFIG_HASH_ANNOTATION: "old"}}}},
    }
    out = status.compute(observed(generation=2, peer=p, deployment=stale, certificate=certificate()), now=T0)
    assert out["phase"] == "Progressing"
    assert conds(out)["Ready"] == ("False", "PodsNotReady")
    assert conds(out)["Available"] == ("True", "PreviousPodsServing")
    assert conds(out)["Progressing"] == ("True", "RollingOut")
    # Surge in progress: one new pod not ready yet, the old ones serving.
    surging = deployment(replicas=3, ready=2, updated=1)
    seen = observed(generation=2, peer=p, deployment=surging, certificate=certificate())
    out = status.compute(seen, now=T0)
    assert (out["phase"], conds(out)["Ready"][0], conds(out)["Available"]) == (
        "Progressing",
        "False",
        ("True", "PreviousPodsServing"),
    )
    done = status.compute(
        observed(generation=2, peer=p, deployment=deployment(), certificate=certificate()), now=T0
    )
    assert (done["phase"], conds(done)["Available"]) == ("Ready", ("True", "MinimumReplicasAvailable"))


def test_session_refs_per_ready_pod():
    pods = (
        status.PodReport("bp-a", True, {"steps": [], "session_refs": 3}),
        status.PodReport("bp-b", True, {"steps": [], "session_refs": 0}),
        status.PodReport("bp-c", True, {"steps": []}),  # a runtime that does not report refs
        status.PodReport("bp-d", True, {"steps": [], "session_refs": "7"}),  # nonsense is not believed
        status.PodReport("bp-e", False, None),
    )
    out = status.compute(
        observed(generation=1, peer=peer(replicas=5), deployment=deployment(), pods=pods), now=T0
    )
    assert out["sessionRefs"] == {"bp-a": 3, "bp-b": 0}
    none = status.compute(observed(generation=1, peer=peer(), deployment=deployment()), now=T0)
    assert "sessionRefs" not in none
