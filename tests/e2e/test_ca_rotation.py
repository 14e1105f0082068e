"""A forced namespace CA rotation on the kind cluster under >= 200 calls/s over mTLS (issue #15).

A client pod keeps ONE ``BlazenPeerClient`` open for the whole run, built with ``tls_files``: its identity
from the mounted client Secret (re-issued by the new CA during the rotation) and its trust from the mounted
namespace trust ConfigMap (old + new roots during the rotation). The test forces a rotation with the
``blazen.dev/rotate-ca`` annotation and asserts: 0 failed calls, every leaf (server and client Secrets)
re-issued by the new CA, every pod serving a new-CA leaf and trusting only the new root at the end (its
/v1/info), no pod restarted or replaced, and the caller's own certificate renewed under load (its files
reloaded, no reconnect by hand): tests/e2e/load_client.py's ``files`` client.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from cryptography import x509

from .clients import TRUST_CONFIGMAP, joined, load_spec, start_load, wait_clients_running
from .conftest import apply, kubectl, kubectl_json, wait_until
from .test_peers import peer, pods, status, wait_ready

RATE = 220  # calls/s offered; >= 200/s must be answered
SECONDS = 420  # longer than a rotation (three kubelet volume syncs, each up to about a minute)


def secret_pem(ns: str, name: str, key: str) -> bytes:
    data = kubectl_json("-n", ns, "get", "secret", name)["data"]
    return base64.b64decode(data[key])


def fingerprint(pem: bytes) -> str:
    from cryptography.hazmat.primitives import hashes

    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def issued_by(leaf: bytes, ca: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    except Exception:
        return False
    return True


def trust_state(ns: str) -> dict[str, Any]:
    cm = kubectl_json("-n", ns, "get", "configmap", TRUST_CONFIGMAP)
    return json.loads((cm["metadata"].get("annotations") or {}).get("blazen.dev/ca-rotation") or "{}")


def pod_info(ns: str, pod: str) -> dict[str, Any]:
    # from inside the pod: the admin port is fenced to the operator by the NetworkPolicy
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/v1/info').read().decode())"
    return json.loads(kubectl("-n", ns, "exec", pod, "--", "python", "-c", code))


def snapshot(ns: str, name: str) -> dict[str, tuple[str, int]]:
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
        for p in pods(ns, name)
    }


# pytest's 300 s default would end the run mid-rotation: the load alone lasts SECONDS.
@pytest.mark.timeout(SECONDS + 600)
def test_forced_ca_rotation_under_load_fails_no_call(operator: str, namespace: str) -> None:
    apply(peer("rot", replicas=2, steps=["examples::echo"]), namespace)
    wait_ready(namespace, "rot", replicas=2)
    state = wait_until(
        "namespace CA in use",
        lambda: trust_state(namespace).get("phase") == "Idle" and trust_state(namespace),
    )
    old_gen = state["generation"]
    old_ca = secret_pem(namespace, "blazen-ca" if old_gen == 1 else f"blazen-ca-{old_gen}", "tls.crt")
    before = snapshot(namespace, "rot")
    leaves = ["rot-tls", "rot-client-tls"]
    old_leaves = {leaf: secret_pem(namespace, leaf, "tls.crt") for leaf in leaves}

    t, out = start_load(
        namespace, "rot", load_spec(namespace, "rot", rate=RATE, seconds=SECONDS, client="files")
    )
    wait_clients_running(namespace)
    time.sleep(10)
    started = time.monotonic()
    kubectl(
        "-n",
        namespace,
        "annotate",
        "configmap",
        TRUST_CONFIGMAP,
        f"blazen.dev/rotate-ca=e2e-{int(time.time())}",
        "--overwrite",
    )
    phases: list[str] = []

    def rotated() -> bool:
        st = trust_state(namespace)
        if not phases or phases[-1] != st.get("phase"):
            phases.append(st.get("phase"))
        return st.get("phase") == "Idle" and st.get("generation") == old_gen + 1

    wait_until("rotation complete", rotated, timeout=SECONDS - 30, interval=2)
    took = time.monotonic() - started
    print(f"rotation took {took:.0f}s through {phases}")
    result = joined(t, out, timeout=SECONDS + 400)

    print(f"load: {result['sent']} sent, {result['ok']} ok, {result['errors']} in {result['elapsed']:.1f}s")
    assert result["errors"] == {}, result
    assert result["ok"] == result["sent"] == RATE * SECONDS, result
    assert result["sent"] / result["elapsed"] >= 200, result
    # the caller followed its renewed client certificate and the bundle's changes, no reconnect by hand
    assert result["tls_generation"] >= 3, result

    new_ca = secret_pem(namespace, f"blazen-ca-{old_gen + 1}", "tls.crt")
    for leaf in leaves:
        pem = secret_pem(namespace, leaf, "tls.crt")
        assert pem != old_leaves[leaf], leaf
        assert issued_by(pem, new_ca), leaf
    bundle = kubectl_json("-n", namespace, "get", "configmap", TRUST_CONFIGMAP)["data"]["ca.crt"]
    assert fingerprint(bundle.encode()) == fingerprint(new_ca)
    assert len(x509.load_pem_x509_certificates(bundle.encode())) == 1, "the old root left the bundle"

    for pod in pods(namespace, "rot"):
        tls = pod_info(namespace, pod["metadata"]["name"])["tls"]
        assert tls["trusted_sha256"] == [fingerprint(new_ca)], pod["metadata"]["name"]
        assert tls["leaf_root_sha256"] == fingerprint(new_ca), pod["metadata"]["name"]
        assert fingerprint(old_ca) not in tls["trusted_sha256"]
    assert snapshot(namespace, "rot") == before, "no pod restarted or replaced"

    conds = {c["type"]: c for c in status(namespace, "rot")["conditions"]}
    assert conds["CARotation"]["status"] == "False"
    reasons = [
        e["reason"]
        for e in kubectl_json(
            "-n", namespace, "get", "events", "--field-selector", "involvedObject.kind=ConfigMap"
        )["items"]
    ]
    for step in ("CaRotationStarted", "CaIssued", "ReissuingLeaves", "LeavesReissued", "CaRotationComplete"):
        assert step in reasons, reasons
