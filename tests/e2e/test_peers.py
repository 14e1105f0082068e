"""BlazenPeers on the kind cluster: the operator, the runtime and cert-manager together.

Clients reach Services two ways: from the host test process through `kubectl port-forward` (one pod behind the
Service), and from a client pod inside the cluster (the example-steps image, which has blazen_peer.client),
which goes through the Service's real load balancing and can sustain hundreds of calls per second.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from blazen_peer.client import BlazenPeerClient, HttpPeerClient
from cryptography import x509

from tests.support.blazen_wheel import DRIVER, blazen_env

from .clients import IMAGE, in_cluster, joined, load_spec, run_load, start_load
from .conftest import (
    GPU_NODE,
    OPERATOR_NS,
    apply,
    kubectl,
    kubectl_json,
    port_forward,
    secret_files,
    wait_until,
)

CPU_STEPS = ["examples::echo", "examples::tokenize", "examples::count", "examples::remember"]


def peer(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image": IMAGE,
        "imagePullPolicy": "Never",
        "entrypoint": "blazen_examples.steps",
        "steps": CPU_STEPS,
        "replicas": 1,
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
    }
    base.update(spec)
    return {
        "apiVersion": "blazen.dev/v1alpha1",
        "kind": "BlazenPeer",
        "metadata": {"name": name},
        "spec": base,
    }


def status(ns: str, name: str) -> dict[str, Any]:
    return kubectl_json("-n", ns, "get", "blazenpeer", name).get("status") or {}


def wait_ready(ns: str, name: str, replicas: int | None = None, timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = status(ns, name)
        if st.get("phase") != "Ready":
            return None
        if replicas is not None and st.get("readyReplicas", 0) != replicas:
            return None
        return st

    return wait_until(f"BlazenPeer {ns}/{name} Ready", ready, timeout=timeout, interval=3)


def pods(ns: str, name: str) -> list[dict[str, Any]]:
    items = kubectl_json("-n", ns, "get", "pods", "-l", f"app.kubernetes.io/instance={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def refusal(coro: Any) -> str:
    """What refused a call that must be refused (an exception's text or the response's error); fails the test
    when the call was served. Callers match the text: a port-forward that died is not a refusal."""
    try:
        resp = asyncio.run(coro)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    assert resp.error is not None, f"served: {resp.result_value()!r}"
    return str(resp.error)


def client_tls(ns: str, name: str, tmp: Path) -> Any:
    return secret_files(ns, status(ns, name)["certificate"]["clientSecretName"], tmp / f"{name}-client")


async def invoke_grpc(
    port: int, ns: str, name: str, tls: Any, steps: list[str], data: dict, **kw: Any
) -> Any:
    async with await BlazenPeerClient.connect(
        f"https://127.0.0.1:{port}",
        "e2e-client",
        root_certificates=tls.ca.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
        private_key=tls.key.read_bytes(),
        server_name=f"{name}.{ns}.svc",
        **kw,
    ) as client:
        return await client.invoke_sub_workflow("examples", steps, data, timeout_secs=30)


CLIENT_PRELUDE = """
import asyncio, json, os, time, collections
from blazen_peer.client import BlazenPeerClient

SVC = os.environ["SVC"]
ROOT, CHAIN, KEY = (open(f"/tls/{f}", "rb").read() for f in ("ca.crt", "tls.crt", "tls.key"))

async def connect():
    return await BlazenPeerClient.connect(f"https://{SVC}:50051", "e2e-incluster", root_certificates=ROOT,
                                          certificate_chain=CHAIN, private_key=KEY)
"""


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_cpu_and_gpu_peers_ready_and_placed_by_pool(operator: str, namespace: str, tmp: Path) -> None:
    apply(peer("cpu", replicas=2), namespace)
    gpu_env = [
        {"name": "BLAZEN_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "BLAZEN_POOL", "value": "gpu"},
    ]
    # Small requests: the kind nodes share a laptop-sized host (GPU peers default to 1 CPU / 4Gi per GPU).
    small = {"requests": {"cpu": "100m", "memory": "256Mi"}}
    apply(
        peer("gpu", steps=["examples::gpu_info"], hardware={"gpu": 1}, env=gpu_env, resources=small),
        namespace,
    )
    wait_ready(namespace, "cpu", replicas=2)
    wait_ready(namespace, "gpu", replicas=1)

    cpu_nodes = {p["spec"]["nodeName"] for p in pods(namespace, "cpu")}
    gpu_pods = pods(namespace, "gpu")
    assert GPU_NODE not in cpu_nodes, cpu_nodes
    assert {p["spec"]["nodeName"] for p in gpu_pods} == {GPU_NODE}
    limits = gpu_pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] in ("1", 1)
    # The status reports what the pods serve (read from their /v1/info), the --steps allow-list applied.
    served = wait_until(
        "served steps reported", lambda: status(namespace, "gpu").get("servedSteps"), timeout=120
    )
    assert served == ["examples::gpu_info"]

    tls = client_tls(namespace, "gpu", tmp)
    with port_forward(namespace, "svc/gpu", 50051) as port:
        resp = asyncio.run(invoke_grpc(port, namespace, "gpu", tls, ["examples::gpu_info"], {}))
    assert resp.error is None, resp.error
    report = resp.result_value()
    assert report["node"] == GPU_NODE
    assert report["pool"] == "gpu"
    assert report["gpu_visible"] is False  # kind: labelled pool, no device

    # The GPU fleet's steps run only there; the CPU fleet's steps answer too.
    tls = client_tls(namespace, "cpu", tmp)
    with port_forward(namespace, "svc/cpu", 50051) as port:
        resp = asyncio.run(
            invoke_grpc(
                port, namespace, "cpu", tls, ["examples::tokenize", "examples::count"], {"text": "a b a"}
            )
        )
    assert resp.error is None, resp.error
    assert resp.result_value() == {"words": 3, "counts": {"a": 2, "b": 1}}


def test_grpc_mtls_and_https_token(operator: str, namespace: str, tmp: Path) -> None:
    token = uuid.uuid4().hex
    kubectl("-n", namespace, "create", "secret", "generic", "peer-token", f"--from-literal=token={token}")
    apply(peer("authd", auth={"tokenSecretRef": {"name": "peer-token"}}, http={"enabled": True}), namespace)
    wait_ready(namespace, "authd")
    tls = client_tls(namespace, "authd", tmp)

    with port_forward(namespace, "svc/authd", 50051) as port:
        resp = asyncio.run(
            invoke_grpc(port, namespace, "authd", tls, ["examples::echo"], {"x": 1}, token=token)
        )
        assert resp.error is None, resp.error
        assert resp.result_value() == {"x": 1}
        no_token = refusal(invoke_grpc(port, namespace, "authd", tls, ["examples::echo"], {"x": 1}))
        assert re.search("bearer token|UNAUTHENTICATED", no_token, re.I), no_token

    ctx = ssl.create_default_context(cadata=tls.ca.read_text())
    ctx.load_cert_chain(tls.cert, tls.key)
    # port-forward reaches 127.0.0.1: verify the chain; the name is checked on the certificate below.
    ctx.check_hostname = False
    cert = x509.load_pem_x509_certificate(
        secret_files(
            namespace, status(namespace, "authd")["certificate"]["secretName"], tmp / "srv"
        ).cert.read_bytes()
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert f"authd.{namespace}.svc" in names

    async def http_call(tok: str | None) -> Any:
        async with HttpPeerClient.new_http(f"https://127.0.0.1:{port}", "e2e", ssl=ctx, token=tok) as c:
            return await c.invoke_sub_workflow("examples", ["examples::echo"], {"h": 2}, timeout_secs=30)

    with port_forward(namespace, "svc/authd", 8080) as port:
        resp = asyncio.run(http_call(token))
        assert resp.error is None, resp.error
        assert resp.result_value() == {"h": 2}
        wrong = refusal(http_call("wrong-token"))
        assert "HTTP 401" in wrong, wrong


def test_https_shim_needs_a_client_certificate_by_default(operator: str, namespace: str, tmp: Path) -> None:
    """The default BlazenPeer (TLS on, no token, http.auth unset) renders --http-auth auto, which the runtime
    resolves to client-cert: an anonymous HTTPS caller is refused, a caller with the client certificate from
    status.certificate.clientSecretName is served."""
    apply(peer("certonly", http={"enabled": True}), namespace)
    wait_ready(namespace, "certonly")
    tls = client_tls(namespace, "certonly", tmp)
    anonymous = ssl.create_default_context(cadata=tls.ca.read_text())
    anonymous.check_hostname = False  # port-forward reaches 127.0.0.1; the chain is still verified
    with_cert = ssl.create_default_context(cadata=tls.ca.read_text())
    with_cert.check_hostname = False
    with_cert.load_cert_chain(tls.cert, tls.key)

    async def http_call(ctx: ssl.SSLContext) -> Any:
        async with HttpPeerClient.new_http(f"https://127.0.0.1:{port}", "e2e", ssl=ctx) as c:
            return await c.invoke_sub_workflow("examples", ["examples::echo"], {"c": 3}, timeout_secs=30)

    # kubectl port-forward exits when the pod resets a connection, as the refused handshake does: one each.
    with port_forward(namespace, "svc/certonly", 8080) as port:
        anon = refusal(http_call(anonymous))
    # the pod ends the handshake; through the port-forward the client sees the connection close, not the alert
    assert re.search("CERTIFICATE_REQUIRED|certificate required|Server disconnected", anon, re.I), anon
    with port_forward(namespace, "svc/certonly", 8080) as port:
        resp = asyncio.run(http_call(with_cert))
        assert resp.error is None, resp.error
        assert resp.result_value() == {"c": 3}


def _ca_issuer(ns: str, name: str) -> None:
    """A cert-manager CA Issuer of the test's own (self-signed root -> CA Certificate -> CA Issuer)."""
    apply(
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": {"name": f"{name}-root"},
            "spec": {"selfSigned": {}},
        },
        ns,
    )
    apply(
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": f"{name}-ca"},
            "spec": {
                "isCA": True,
                "commonName": f"{name}-ca",
                "secretName": f"{name}-ca",
                "privateKey": {"algorithm": "ECDSA", "size": 256},
                "issuerRef": {"name": f"{name}-root", "kind": "Issuer"},
            },
        },
        ns,
    )
    apply(
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": {"name": name},
            "spec": {"ca": {"secretName": f"{name}-ca"}},
        },
        ns,
    )


def test_issuer_ref_without_trust_bundle_authenticates_callers_by_token(
    operator: str, namespace: str, tmp: Path
) -> None:
    """tls.issuerRef without tls.trustBundle: the operator cannot know whether the issuer writes a ca.crt
    (ACME does not), so it renders --tls-client-auth none and the CRD requires a token. The peer serves TLS
    without asking for a client certificate; the token is what lets a caller in."""
    _ca_issuer(namespace, "corp")
    token = uuid.uuid4().hex
    kubectl("-n", namespace, "create", "secret", "generic", "corp-token", f"--from-literal=token={token}")
    spec = {
        "tls": {"issuerRef": {"name": "corp", "kind": "Issuer"}},
        "auth": {"tokenSecretRef": {"name": "corp-token"}},
    }
    apply(peer("corp", **spec), namespace)
    st = wait_ready(namespace, "corp")
    args = pods(namespace, "corp")[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--tls-client-auth") + 1] == "none"
    ca = secret_files(namespace, st["certificate"]["secretName"], tmp / "corp-srv").ca.read_bytes()

    async def call(tok: str | None) -> Any:
        async with await BlazenPeerClient.connect(
            f"https://127.0.0.1:{port}",
            "e2e-token-only",
            root_certificates=ca,
            token=tok,
            server_name=f"corp.{namespace}.svc",
        ) as client:
            return await client.invoke_sub_workflow("examples", ["examples::echo"], {"t": 1}, timeout_secs=30)

    with port_forward(namespace, "svc/corp", 50051) as port:
        resp = asyncio.run(call(token))  # no client certificate
        assert resp.error is None, resp.error
        assert resp.result_value() == {"t": 1}
        for tok in (None, "wrong-" + token):
            why = refusal(call(tok))
            assert re.search("bearer token|UNAUTHENTICATED", why, re.I), why
    pod = pods(namespace, "corp")[0]["metadata"]["name"]
    with (
        port_forward(namespace, f"pod/{pod}", 9090) as port,
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=10) as r,
    ):
        info = json.loads(r.read())
    # this issuer writes a ca.crt: siblings are verified against it, not the system roots
    tls = info["tls"]
    assert (tls["client_auth"], tls["outbound_trust"]) == ("none", "ca-bundle")


def test_blazen_wheel_client_through_plaintext_opt_in(
    operator: str, namespace: str, isoc23_shim: Path
) -> None:
    apply(peer("plain", plaintextGrpc={"enabled": True, "allowedFrom": [{"podSelector": {}}]}), namespace)
    st = wait_ready(namespace, "plain")
    assert st["endpoints"]["plaintextGrpc"].endswith(":50052")
    node_id = pods(namespace, "plain")[0]["metadata"]["name"]
    with port_forward(namespace, "svc/plain", 50052) as port:
        spec = {
            "grpc": f"http://127.0.0.1:{port}",
            "http": None,
            "node_id": node_id,
            "ops": [
                {"op": "invoke", "workflow": "examples", "steps": ["examples::echo"], "input": {"w": 1}},
                {
                    "op": "invoke",
                    "workflow": "examples",
                    "steps": ["examples::tokenize", "examples::count"],
                    "input": {"text": "x y x"},
                },
            ],
        }
        out = subprocess.run(
            [sys.executable, str(DRIVER)],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            env=blazen_env(isoc23_shim),
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert results[0].get("error") is None, results
    assert results[0]["result"] == {"w": 1}
    assert results[1]["result"] == {"words": 3, "counts": {"x": 2, "y": 1}}


def test_deref_and_release_across_replicas_through_the_service(operator: str, namespace: str) -> None:
    apply(peer("refs", replicas=3), namespace)
    wait_ready(namespace, "refs", replicas=3)
    script = (
        CLIENT_PRELUDE
        + """
async def main():
    made, derefs, released = [], 0, 0
    # A new connection per call: kube-proxy balances connections, so refs land on different replicas.
    for i in range(24):
        c = await connect()
        resp = await c.invoke_sub_workflow("examples", ["examples::remember"], {"value": f"v{i}"},
                                           timeout_secs=10)
        assert resp.error is None, resp.error
        ref = resp.result_value()["ref"]
        if isinstance(ref, dict):  # a session-ref marker: {"__blazen_session_ref__": uuid}
            ref = ref["__blazen_session_ref__"]
        made.append((ref, f"v{i}", [d.origin_node_id for d in resp.remote_refs.values()]))
        await c.close()
    for ref, value, _ in made:
        c = await connect()
        payload = await c.deref_session_ref(ref)
        assert value in payload.decode(errors="replace"), (ref, payload)
        derefs += 1
        await c.close()
    for ref, _, _ in made:
        c = await connect()
        released += bool(await c.release_session_ref(ref))
        await c.close()
    origins = sorted({o for _, _, os_ in made for o in os_})
    print(json.dumps({"made": len(made), "derefs": derefs, "released": released, "origins": origins}))

asyncio.run(main())
"""
    )
    out = in_cluster(namespace, "refs", script)
    origins = out.pop("origins")
    assert out == {"made": 24, "derefs": 24, "released": 24}
    # The refs were made on more than one replica, so derefs/releases through the Service crossed replicas
    # (each one landed on any of the three and was forwarded to the holder when needed).
    assert len(origins) >= 2, origins
    assert set(origins) <= {p["metadata"]["name"] for p in pods(namespace, "refs")}


def _force_renewal(ns: str, cert: str) -> None:
    """What `cmctl renew` does: set the Issuing condition on the Certificate's status."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conds = (kubectl_json("-n", ns, "get", "certificate", cert).get("status") or {}).get("conditions", [])
    conds = [c for c in conds if c["type"] != "Issuing"]
    conds.append(
        {
            "type": "Issuing",
            "status": "True",
            "reason": "ManuallyTriggered",
            "message": "e2e: forced renewal",
            "lastTransitionTime": now,
        }
    )
    kubectl(
        "-n",
        ns,
        "patch",
        "certificate",
        cert,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"conditions": conds}}),
    )


def _serial(ns: str, secret: str, tmp: Path) -> int:
    files = secret_files(ns, secret, tmp / f"serial-{uuid.uuid4().hex[:6]}")
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def test_certificate_renewal_under_load(operator: str, namespace: str, tmp: Path) -> None:
    apply(peer("renew", replicas=2, steps=["examples::echo"]), namespace)
    wait_ready(namespace, "renew", replicas=2)
    cert = status(namespace, "renew")["certificate"]["name"]
    secret = status(namespace, "renew")["certificate"]["secretName"]

    def restarts() -> dict[str, tuple[str, int]]:
        return {
            p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
            for p in pods(namespace, "renew")
        }

    before = restarts()
    serials = [_serial(namespace, secret, tmp)]

    t, out = start_load(namespace, "renew", load_spec(namespace, "renew", rate=200, seconds=30, channels=8))
    for at in (10, 20):  # seconds into the load (the client pod needs a few seconds to start)
        time.sleep(at - (10 if at == 20 else 0))
        _force_renewal(namespace, cert)
        serials.append(
            wait_until(
                "a new serial",
                lambda: (s := _serial(namespace, secret, tmp)) != serials[-1] and s,
                timeout=60,
                interval=1,
            )
        )
    result = joined(t, out)
    assert result["errors"] == {}, result
    assert result["ok"] == result["sent"] == 6000, result
    assert result["elapsed"] < 45, result  # the offered 200 calls/s were sustained
    assert len(set(serials)) == 3, serials
    assert restarts() == before  # same pods, no container restart during the renewals


def test_spec_change_rolls_pods(operator: str, namespace: str) -> None:
    apply(peer("roll", replicas=2), namespace)
    wait_ready(namespace, "roll", replicas=2)
    before = {p["metadata"]["name"] for p in pods(namespace, "roll")}
    kubectl(
        "-n",
        namespace,
        "patch",
        "blazenpeer",
        "roll",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"env": [{"name": "E2E_ROLL", "value": "2"}]}}),
    )

    def rolled() -> bool:
        now = pods(namespace, "roll")
        names = {p["metadata"]["name"] for p in now}
        envs = [{e["name"]: e.get("value") for e in p["spec"]["containers"][0].get("env", [])} for p in now]
        return len(now) == 2 and not (names & before) and all(e.get("E2E_ROLL") == "2" for e in envs)

    wait_until("pods rolled onto the new spec", rolled, timeout=240, interval=3)
    wait_ready(namespace, "roll", replicas=2)


def test_scale_up_and_down(operator: str, namespace: str) -> None:
    apply(peer("scale", replicas=1), namespace)
    wait_ready(namespace, "scale", replicas=1)
    kubectl("-n", namespace, "scale", "blazenpeer/scale", "--replicas=3")
    wait_ready(namespace, "scale", replicas=3)
    assert len(pods(namespace, "scale")) == 3
    kubectl("-n", namespace, "scale", "blazenpeer/scale", "--replicas=1")
    wait_ready(namespace, "scale", replicas=1)
    wait_until("scale-down to one pod", lambda: len(pods(namespace, "scale")) == 1, timeout=120)


def test_pod_deleted_under_load_fails_no_call(operator: str, namespace: str) -> None:
    """A graceful delete (SIGTERM) drains: not ready, admitting while the endpoints catch up, GOAWAY,
    in-flight calls finished; no call fails. A SIGKILL is tests/e2e/test_hitless.py's chaos test."""
    apply(peer("chaos", replicas=2, steps=["examples::echo"]), namespace)
    wait_ready(namespace, "chaos", replicas=2)
    victim = pods(namespace, "chaos")[0]["metadata"]["name"]
    t, out = start_load(namespace, "chaos", load_spec(namespace, "chaos", rate=50, seconds=30, channels=4))
    time.sleep(12)
    kubectl("-n", namespace, "delete", "pod", victim, "--wait=false")
    result = joined(t, out)
    assert result["elapsed"] < 60, result
    assert result["errors"] == {}, result
    assert result["ok"] == result["sent"] == 50 * 30, result
    wait_ready(namespace, "chaos", replicas=2)
    after = run_load(namespace, "chaos", load_spec(namespace, "chaos", rate=20, seconds=5, channels=2))
    assert after["errors"] == {}, after
    assert after["ok"] == after["sent"]


def test_deleting_the_blazenpeer_removes_every_child(operator: str, namespace: str) -> None:
    apply(peer("gone", replicas=1, http={"enabled": True}), namespace)
    wait_ready(namespace, "gone")
    selector = "blazen.dev/peer=gone"
    kinds = ",".join(
        [
            "deployments",
            "replicasets",
            "pods",
            "services",
            "certificates.cert-manager.io",
            "secrets",
            "configmaps",
            "serviceaccounts",
            "roles",
            "rolebindings",
            "poddisruptionbudgets",
            "networkpolicies",
        ]
    )
    children = kubectl("-n", namespace, "get", kinds, "-l", selector, "-o", "name").split()
    assert any(c.startswith("deployment") for c in children), children
    kubectl("-n", namespace, "delete", "blazenpeer", "gone", "--wait=true", timeout=180)
    wait_until(
        "every child gone",
        lambda: not kubectl("-n", namespace, "get", kinds, "-l", selector, "-o", "name").split(),
        timeout=180,
        interval=3,
    )


def test_operator_killed_mid_reconcile_converges(operator: str, namespace: str) -> None:
    apply(peer("survivor", replicas=2), namespace)
    time.sleep(1.5)  # the operator has picked it up and is creating children
    op_pods = kubectl_json("-n", OPERATOR_NS, "get", "pods", "-l", "app.kubernetes.io/name=blazen-operator")
    for p in op_pods["items"]:
        kubectl("-n", OPERATOR_NS, "delete", "pod", p["metadata"]["name"], "--grace-period=0", "--force")
    wait_ready(namespace, "survivor", replicas=2, timeout=360)
    st = status(namespace, "survivor")
    gen = kubectl_json("-n", namespace, "get", "blazenpeer", "survivor")["metadata"]["generation"]
    assert st.get("observedGeneration") == gen
