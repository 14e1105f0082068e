"""A forced namespace CA rotation on the real API server with cert-manager's real controller (issue #15):
the new CA under a new name, the trust bundle old + new, the CA Issuer switched, every leaf (servers,
callers, a fleet's pool and router) re-issued by cert-manager through the Issuing condition, the old root
dropped and the old CA deleted, Events at each step and the CARotation condition on the BlazenPeers. And a
user CA Issuer whose CA is replaced: the overlap the operator keeps in that issuer's trust bundle.

The control plane has no kubelet: pods never run, so no pod reports its trust and the pod gates are empty
(tests/unit/test_ca_rotation.py and tests/unit/test_issuer_trust.py cover them; tests/e2e/test_ca_rotation.py
runs it all on kind)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from blazen_operator.apply import Api, path_for
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.support import controlplane
from tests.support.controlplane import eventually
from tests.support.pki import CA
from tests.support.ports import free_port

from .test_operator_api import ROTATION_VERBS, create, get, manifest, merge_patch

LEAVES = ("a-tls", "a-client-tls", "b-tls", "b-client-tls", "f-router-tls", "f-cpu-tls", "f-cpu-client-tls")
USER_BUNDLE = "blazen-trust-issuer-corp"


@pytest.fixture(scope="module")
def cert_manager(control_plane: controlplane.ControlPlane, api: Api) -> Iterator[None]:
    from bench.operator import scale_paths

    binary = scale_paths()["cert-manager-controller"]
    if not binary.exists():
        pytest.fail(f"cert-manager's controller is not built: {binary} (hack/kind-lib.sh places it)")
    proc = control_plane.spawn(
        "cert-manager-controller-rotation",
        [
            str(binary),
            f"--kubeconfig={control_plane.kubeconfig}",
            "--leader-elect=false",
            f"--metrics-listen-address=127.0.0.1:{free_port()}",
            "-v=1",
        ],
    )
    try:
        yield None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def secret_pem(api: Api, ns: str, name: str, key: str) -> bytes | None:
    secret = get(api, "Secret", ns, name)
    raw = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(raw) if raw else None


def issued_by(leaf_pem: bytes, ca_pem: bytes) -> bool:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    try:
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except Exception:
        return False
    return True


def state(api: Api, ns: str, name: str = "blazen-trust") -> tuple[dict[str, Any], list[bytes]]:
    cm = get(api, "ConfigMap", ns, name) or {"metadata": {}}
    annotations = cm["metadata"].get("annotations") or {}
    bundle = (cm.get("data") or {}).get("ca.crt", "")
    roots = (
        [c.public_bytes(Encoding.PEM) for c in x509.load_pem_x509_certificates(bundle.encode())]
        if bundle
        else []
    )
    return json.loads(annotations.get("blazen.dev/ca-rotation") or "{}"), roots


def trust_events(api: Api, ns: str) -> list[str]:
    items = [
        e for e in api.collect("v1", "Event", ns).items if e["involvedObject"].get("kind") == "ConfigMap"
    ]
    return [
        e["reason"]
        for e in sorted(items, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))
    ]


def test_forced_rotation_goes_through_every_phase(api, operator, operator_calls, cert_manager, namespace):
    operator_calls.calls.clear()
    for name in ("a", "b"):
        create(api, manifest(name, namespace, replicas=0))
    # a fleet: its router's leaf (<fleet>-router-tls) is signed by the namespace CA too
    fleet = {
        "apiVersion": "blazen.dev/v1alpha1",
        "kind": "BlazenFleet",
        "metadata": {"name": "f", "namespace": namespace},
        "spec": {
            "image": "reg.local/peer:1",
            "entrypoint": "blazen_examples.steps",
            "router": {"replicas": 0},
            "pools": [{"name": "cpu", "replicas": 0, "steps": ["examples::echo"]}],
        },
    }
    api.request("POST", path_for("blazen.dev/v1alpha1", "BlazenFleet", namespace), body=fleet)

    def bootstrapped() -> bytes:
        _, roots = state(api, namespace)
        assert len(roots) == 1, roots
        for leaf in LEAVES:
            pem = secret_pem(api, namespace, leaf, "tls.crt")
            assert pem, leaf
            assert issued_by(pem, roots[0]), leaf
        return roots[0]

    old = eventually(bootstrapped, timeout=120, what="namespace CA and leaves issued")
    before = {leaf: secret_pem(api, namespace, leaf, "tls.crt") for leaf in LEAVES}

    merge_patch(
        api,
        "ConfigMap",
        namespace,
        "blazen-trust",
        {"metadata": {"annotations": {"blazen.dev/rotate-ca": "test-1"}}},
        api_version="v1",
    )
    started = time.monotonic()
    seen: list[tuple[str, int]] = []
    conditions: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st, roots = state(api, namespace)
        if not seen or seen[-1] != (st.get("phase"), len(roots)):
            seen.append((st.get("phase"), len(roots)))
        for name in ("a", "b"):
            for c in (get(api, "BlazenPeer", namespace, name) or {}).get("status", {}).get(
                "conditions"
            ) or []:
                if c["type"] == "CARotation" and c["status"] == "True":
                    conditions.add(c["reason"])
        if st.get("phase") == "Idle" and st.get("generation") == 2:
            break
        time.sleep(0.3)
    print(f"\nforced rotation took {time.monotonic() - started:.1f}s through {seen}")
    st, roots = state(api, namespace)
    assert (st.get("phase"), st.get("generation"), st.get("handled")) == ("Idle", 2, "test-1"), seen

    # the bundle held old + new from Trusting until the leaves had moved; then only the new root
    phases = [p for p, _ in seen]
    assert "Reissuing" in phases or "Trusting" in phases, seen
    for phase, n in seen:
        if phase in ("Trusting", "Reissuing"):
            assert n == 2, seen
    new = secret_pem(api, namespace, "blazen-ca-2", "tls.crt")
    assert new is not None
    assert roots == [x509.load_pem_x509_certificate(new).public_bytes(Encoding.PEM)]
    assert old not in roots

    # every leaf, servers and callers, re-issued by the new CA, with a new certificate
    for leaf in LEAVES:
        pem = secret_pem(api, namespace, leaf, "tls.crt")
        assert pem != before[leaf], leaf
        assert issued_by(pem, new), leaf
        assert secret_pem(api, namespace, leaf, "ca.crt") == new, leaf

    issuer = get(api, "Issuer", namespace, "blazen-ca")
    assert issuer["spec"]["ca"]["secretName"] == "blazen-ca-2"
    eventually(
        lambda: get(api, "Certificate", namespace, "blazen-ca") is None, what="old CA Certificate deleted"
    )
    eventually(lambda: get(api, "Secret", namespace, "blazen-ca") is None, what="old CA Secret deleted")
    cert = get(api, "Certificate", namespace, "blazen-ca-2")
    assert [r["kind"] for r in cert["metadata"]["ownerReferences"]] == ["ConfigMap"]

    def all_events() -> bool:
        reasons = trust_events(api, namespace)
        expected = [
            "CaRotationStarted",
            "CaIssued",
            "ReissuingLeaves",
            "LeavesReissued",
            "CaRotationComplete",
        ]
        assert [r for r in reasons if r in expected] == expected, reasons
        return True

    eventually(all_events, what="an Event per step")
    # the chart's grants only a rotation uses (test_the_operator_uses_every_verb_the_chart_grants leaves them)
    used = {c for c in operator_calls.calls if c in ROTATION_VERBS}
    assert used == ROTATION_VERBS, sorted(ROTATION_VERBS - used)
    assert conditions, "the BlazenPeers showed the rotation as their CARotation condition"

    def idle_condition() -> bool:
        for name in ("a", "b"):
            conds = {c["type"]: c for c in get(api, "BlazenPeer", namespace, name)["status"]["conditions"]}
            assert conds["CARotation"]["status"] == "False", conds["CARotation"]
            assert conds["CARotation"]["reason"] == "Idle"
        return True

    eventually(idle_condition, timeout=60, what="CARotation back to Idle")

    # the same value again does not rotate again
    time.sleep(1)
    assert state(api, namespace)[0]["generation"] == 2
    assert get(api, "Certificate", namespace, "blazen-ca-3") is None


def _tls_secret(namespace: str, name: str, ca: CA) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": namespace},
        "data": {
            "tls.crt": base64.b64encode(ca.cert_pem).decode(),
            "tls.key": base64.b64encode(ca.issued.key_pem).decode(),
        },
    }


def test_a_user_issuers_new_ca_is_overlapped_and_the_old_dropped(
    api, operator, operator_calls, cert_manager, namespace
):
    """tls.issuerRef names the user's CA Issuer; its CA is replaced and one leaf renews on it (what
    cert-manager does at each leaf's own renewal): the operator sees the new ca.crt, puts old + new into the
    issuer's trust bundle, re-issues the other leaves, then drops the old root."""
    old, new = CA("corp-old"), CA("corp-new")
    api.request("POST", path_for("v1", "Secret", namespace), body=_tls_secret(namespace, "corp-ca", old))
    issuer = {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Issuer",
        "metadata": {"name": "corp", "namespace": namespace},
        "spec": {"ca": {"secretName": "corp-ca"}},
    }
    api.request("POST", path_for("cert-manager.io/v1", "Issuer", namespace), body=issuer)
    tls = {"issuerRef": {"name": "corp"}}
    create(api, manifest("u", namespace, replicas=0, tls=tls, auth={"tokenSecretRef": {"name": "t"}}))
    leaves = ("u-tls", "u-client-tls")

    def bundle() -> tuple[dict[str, Any], list[bytes]]:
        return state(api, namespace, USER_BUNDLE)

    def bootstrapped() -> bool:
        assert bundle()[1] == [old.cert_pem], bundle()
        for leaf in leaves:
            assert issued_by(secret_pem(api, namespace, leaf, "tls.crt") or b"", old.cert_pem), leaf
        return True

    eventually(bootstrapped, timeout=120, what="the issuer's leaves issued and its CA in the bundle")
    # the pods read that bundle, not their leaf Secret's ca.crt
    deployment = get(api, "Deployment", namespace, "u")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["trust"]["configMap"]["name"] == USER_BUNDLE
    before = secret_pem(api, namespace, "u-client-tls", "tls.crt")

    # the user replaces the issuer's CA; cert-manager re-issues nothing by itself, so renew one leaf as its
    # own renewBefore would (the Issuing condition, what `cmctl renew` sets)
    merge_patch(
        api,
        "Secret",
        namespace,
        "corp-ca",
        {"data": _tls_secret(namespace, "corp-ca", new)["data"]},
        api_version="v1",
    )
    cert = get(api, "Certificate", namespace, "u-tls")
    merge_patch(
        api,
        "Certificate",
        namespace,
        "u-tls",
        {
            "status": {
                "conditions": [
                    *[x for x in cert["status"]["conditions"] if x["type"] != "Issuing"],
                    {
                        "type": "Issuing",
                        "status": "True",
                        "reason": "ManuallyTriggered",
                        "message": "test: the leaf's own renewal",
                        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                ]
            }
        },
        sub="status",
        api_version="cert-manager.io/v1",
    )
    started = time.monotonic()
    seen: list[tuple[str, int]] = []
    conditions: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st, roots = bundle()
        if not seen or seen[-1] != (st.get("phase"), len(roots)):
            seen.append((st.get("phase"), len(roots)))
        for c in (get(api, "BlazenPeer", namespace, "u") or {}).get("status", {}).get("conditions") or []:
            if c["type"] == "CARotation" and c["status"] == "True":
                conditions.add(c["reason"])
        if len(seen) > 1 and st.get("phase") == "Idle":
            break
        time.sleep(0.3)
    print(f"\nuser issuer overlap took {time.monotonic() - started:.1f}s through {seen}")
    st, roots = bundle()
    assert (st.get("phase"), st.get("reason")) == ("Idle", "CaChanged"), seen
    assert roots == [new.cert_pem], "only the new root at the end"
    assert ("Trusting", 2) in seen or ("Reissuing", 2) in seen, seen
    for phase, n in seen:
        if phase in ("Trusting", "Reissuing"):
            assert n == 2, seen
    for leaf in leaves:
        assert issued_by(secret_pem(api, namespace, leaf, "tls.crt") or b"", new.cert_pem), leaf
    assert secret_pem(api, namespace, "u-client-tls", "tls.crt") != before, "re-issued by the operator"
    assert conditions, "the BlazenPeer showed the overlap as its CARotation condition"

    def all_events() -> bool:
        reasons = trust_events(api, namespace)
        expected = ["CaChanged", "ReissuingLeaves", "LeavesReissued", "CaRotationComplete"]
        assert [r for r in reasons if r in expected] == expected, reasons
        return True

    eventually(all_events, what="an Event per step on the issuer's trust bundle")

    # the BlazenPeer moves to another issuer: the bundle nobody reads any more is deleted
    merge_patch(api, "BlazenPeer", namespace, "u", {"spec": {"tls": {"issuerRef": {"name": "other"}}}})
    eventually(
        lambda: get(api, "ConfigMap", namespace, USER_BUNDLE) is None,
        timeout=90,
        what="the retired issuer's trust bundle deleted",
    )
