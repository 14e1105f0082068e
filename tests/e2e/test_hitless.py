"""Hitless operations on the kind cluster: a rollout, a scale-down, a node drain and a token rotation, each
under >= 200 calls/s from two client pods that each keep ONE channel open through the Service, our client
(gRPC, mutual TLS, the token) and the real blazen wheel (the plaintext opt-in), with 0 failed calls; and a
SIGKILLed replica, where exactly the calls in flight on it fail, with a transport error.

What makes it hold (docs/operator.md, "What a rollout guarantees"): Surge rollouts (maxUnavailable 0), the
runtime's drain (not ready at once, admitting for pod.drainAdmitSeconds while the endpoints drop the pod,
graceful GOAWAYs moving open channels to staying replicas, in-flight calls finishing within
pod.terminationGracePeriodSeconds), the PodDisruptionBudget, and a token re-read from its mounted file.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from blazen_peer.client import BlazenPeerClient
from blazen_peer.client.errors import PeerError

from tests.support.blazen_wheel import raced_a_goaway

from .clients import in_cluster, joined, load_spec, start_load, wait_clients_running
from .conftest import CPU_NODE, GPU_NODE, apply, kubectl, kubectl_json, port_forward, secret_files, wait_until
from .test_peers import peer, pods, status, wait_ready

RATE = 220  # calls/s our client offers on its one channel
WHEEL_RATE = 60  # calls/s the real blazen wheel offers on its one channel (plaintext opt-in)
CONNECTION_AGE = 5  # s between GOAWAYs on one connection: the default pod.drainAdmitSeconds (10) / 2
MAX_PODS_STOPPED = 3  # under load in any test here
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
#: the plaintext listener Blazen's own clients need, open to the e2e client pods only
PLAINTEXT = {
    "plaintextGrpc": {"enabled": True, "allowedFrom": [{"podSelector": {"matchLabels": {"e2e": "client"}}}]}
}


def load(ns: str, name: str, seconds: int, token: str = "", wait_for_ready: bool = False) -> Any:
    """Our one-channel load client in a pod, in the background; ``joined()`` returns its result."""
    spec = load_spec(ns, name, rate=RATE, seconds=seconds, token=token, wait_for_ready=wait_for_ready)
    return start_load(ns, name, spec)


def loads(ns: str, name: str, seconds: int, token: str = "") -> list[Any]:
    """Our client (gRPC, mutual TLS, ``token``) and the real blazen wheel (plaintext opt-in), each on one
    channel kept for the whole run, in two pods at once."""
    wheel = load_spec(ns, name, rate=WHEEL_RATE, seconds=seconds, client="wheel")
    return [load(ns, name, seconds, token=token), start_load(ns, name, wheel)]


def assert_no_failed_call(results: list[dict[str, Any]], seconds: int) -> None:
    """Every call of every client answered right, and >= 200 calls/s between them - except, for the wheel
    only, calls its transport failed before sending because they raced a graceful GOAWAY (tonic does not
    retry them as grpcio does; the peer never saw them: tests/interop, ``raced_a_goaway``), at most a few per
    GOAWAY its one connection can receive: one per connection age, one more per pod that stopped."""
    for r in results:
        print(f"{r['client']}: {r['sent']} sent, {r['ok']} ok, {r['errors']} in {r['elapsed']:.1f}s")
        wheel = r["client"] == "wheel"
        raced = {k: n for k, n in r["errors"].items() if wheel and raced_a_goaway(k.partition(":")[2])}
        assert {k: n for k, n in r["errors"].items() if k not in raced} == {}, r
        assert sum(raced.values()) <= seconds // CONNECTION_AGE + MAX_PODS_STOPPED, r
        assert r["ok"] + sum(raced.values()) == r["sent"] == r["rate"] * seconds, r
    assert sum(r["sent"] / r["elapsed"] for r in results) >= 200, results


def started_load(ns: str, clients: int = 2) -> None:
    """Waits until the client pods are running, so what follows happens under load."""
    wait_clients_running(ns, clients)
    time.sleep(5)


def restarts(ns: str, name: str) -> dict[str, tuple[str, int]]:
    return {
        p["metadata"]["name"]: (p["metadata"]["uid"], p["status"]["containerStatuses"][0]["restartCount"])
        for p in pods(ns, name)
    }


def test_rollout_of_two_replicas_fails_no_call(operator: str, namespace: str, wheel_on_node: str) -> None:
    apply(peer("roll", replicas=2, steps=["examples::echo"], **PLAINTEXT), namespace)
    wait_ready(namespace, "roll", replicas=2)
    before = set(restarts(namespace, "roll"))
    running = loads(namespace, "roll", 90)
    started_load(namespace)
    patch = {"spec": {"env": [{"name": "E2E_ROLL", "value": "2"}]}}
    kubectl("-n", namespace, "patch", "blazenpeer", "roll", "--type=merge", "-p", json.dumps(patch))

    def rolled() -> bool:
        now = pods(namespace, "roll")
        return len(now) == 2 and not ({p["metadata"]["name"] for p in now} & before)

    wait_until("both pods replaced", rolled, timeout=240, interval=2)
    wait_ready(namespace, "roll", replicas=2)
    assert_no_failed_call([joined(t, out) for t, out in running], 90)


def test_scale_down_three_to_one_fails_no_call(operator: str, namespace: str, wheel_on_node: str) -> None:
    apply(peer("shrink", replicas=3, steps=["examples::echo"], **PLAINTEXT), namespace)
    wait_ready(namespace, "shrink", replicas=3)
    running = loads(namespace, "shrink", 60)
    started_load(namespace)
    kubectl("-n", namespace, "scale", "blazenpeer/shrink", "--replicas=1")
    wait_until("one pod left", lambda: len(pods(namespace, "shrink")) == 1, timeout=120, interval=1)
    assert_no_failed_call([joined(t, out) for t, out in running], 60)
    wait_ready(namespace, "shrink", replicas=1)


def test_drain_of_the_node_holding_a_replica_fails_no_call(
    operator: str, namespace: str, wheel_on_node: str
) -> None:
    # One replica per schedulable worker (the GPU worker included: the peer tolerates its taint), so draining
    # GPU_NODE evicts one replica through the PodDisruptionBudget while the client pod stays on CPU_NODE.
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "nodeTaintsPolicy": "Honor",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "drained"}},
            "matchLabelKeys": ["pod-template-hash"],
        }
    ]
    spec = {
        "tolerations": [GPU_TOLERATION],
        "topologySpreadConstraints": spread,
        "steps": ["examples::echo"],
        **PLAINTEXT,
    }
    apply(peer("drained", replicas=2, **spec), namespace)
    wait_ready(namespace, "drained", replicas=2)
    assert {p["spec"]["nodeName"] for p in pods(namespace, "drained")} == {CPU_NODE, GPU_NODE}
    assert kubectl_json("-n", namespace, "get", "pdb", "drained")["spec"]["maxUnavailable"] == 1
    running = loads(namespace, "drained", 90)
    started_load(namespace)
    try:
        kubectl(
            "drain",
            GPU_NODE,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--pod-selector=app.kubernetes.io/instance=drained",
            "--timeout=180s",
            timeout=240,
        )
        wait_ready(namespace, "drained", replicas=2)
        assert {p["spec"]["nodeName"] for p in pods(namespace, "drained")} == {CPU_NODE}
        assert_no_failed_call([joined(t, out) for t, out in running], 90)
    finally:
        kubectl("uncordon", GPU_NODE)


def _secret(ns: str, name: str, token: str) -> None:
    data = {"token": base64.b64encode(token.encode()).decode()}
    apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": data}, ns)


async def _call(port: int, ns: str, name: str, tls: Any, token: str) -> bool:
    """True when a call with ``token`` is answered, False when it is refused UNAUTHENTICATED."""
    async with await BlazenPeerClient.connect(
        f"https://127.0.0.1:{port}",
        "e2e-token",
        root_certificates=tls.ca.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
        private_key=tls.key.read_bytes(),
        server_name=f"{name}.{ns}.svc",
        token=token,
    ) as client:
        try:
            resp = await client.invoke_sub_workflow("examples", ["examples::echo"], {"x": 1}, timeout_secs=10)
        except PeerError as exc:
            if getattr(exc, "code", None) != "UNAUTHENTICATED":
                raise
            return False
        return resp.error is None


def test_token_rotation_restarts_nothing_and_fails_no_call(
    operator: str, namespace: str, tmp_path: Path, wheel_on_node: str
) -> None:
    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    _secret(namespace, "rot-token", old)
    apply(
        peer(
            "rot",
            replicas=2,
            steps=["examples::echo"],
            auth={"tokenSecretRef": {"name": "rot-token"}},
            **PLAINTEXT,
        ),
        namespace,
    )
    wait_ready(namespace, "rot", replicas=2)
    before = restarts(namespace, "rot")
    generation = kubectl_json("-n", namespace, "get", "deployment", "rot")["metadata"]["generation"]
    tls = secret_files(namespace, status(namespace, "rot")["certificate"]["clientSecretName"], tmp_path / "c")

    # The old token keeps working across the switch: our load (old token) runs through the rotation, and the
    # wheel's (plaintext: no token) with it.
    running = loads(namespace, "rot", 60, token=old)
    started_load(namespace)
    _secret(namespace, "rot-token", new)
    for pod in before:
        with port_forward(namespace, f"pod/{pod}", 50051) as port:
            wait_until(
                f"{pod} accepts the new token",
                lambda port=port: asyncio.run(_call(port, namespace, "rot", tls, new)),
                timeout=180,
                interval=3,
            )
    assert_no_failed_call([joined(t, out) for t, out in running], 60)
    # After the runtime's 120 s overlap the old token is refused, the new one accepted, on every pod.
    for pod in before:
        with port_forward(namespace, f"pod/{pod}", 50051) as port:
            wait_until(
                f"{pod} refuses the old token",
                lambda port=port: not asyncio.run(_call(port, namespace, "rot", tls, old)),
                timeout=300,
                interval=5,
            )
            assert asyncio.run(_call(port, namespace, "rot", tls, new))
    assert restarts(namespace, "rot") == before, "a token rotation must not restart or replace a pod"
    assert kubectl_json("-n", namespace, "get", "deployment", "rot")["metadata"]["generation"] == generation


def _sigkill(pod: dict[str, Any]) -> tuple[float, float]:
    """SIGKILL the peer container's process on its kind node (no SIGTERM, no drain); returns the wall-clock
    interval the kill happened in (the client pod shares the host's clock)."""
    node = pod["spec"]["nodeName"]
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    pid = subprocess.run(
        [
            "docker",
            "exec",
            node,
            "crictl",
            "inspect",
            "--output",
            "go-template",
            "--template",
            "{{.info.pid}}",
            cid,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    before = time.time()
    subprocess.run(["docker", "exec", node, "kill", "-9", pid], check=True)
    return before, time.time()


def test_sigkilled_replica_fails_exactly_its_in_flight_calls(operator: str, namespace: str) -> None:
    """No drain can save calls in flight on a killed process: those fail, with a transport status
    (UNAVAILABLE), and nothing else does. The client waits for a ready connection (wait_for_ready), so calls
    issued while its channel reconnects wait instead of failing fast."""
    apply(peer("chaos", replicas=2, steps=["examples::echo"]), namespace)
    wait_ready(namespace, "chaos", replicas=2)
    t, out = load(namespace, "chaos", 40, wait_for_ready=True)
    started_load(namespace, clients=1)
    killed_from, killed_by = _sigkill(pods(namespace, "chaos")[0])
    result = joined(t, out)
    print(f"chaos: {result['sent']} sent, {result['ok']} ok, {result['errors']}")
    assert result["sent"] == RATE * 40
    # The client learns of the death when the killed process's connection resets, a few ms after `kill`
    # returns; a call sent on that connection before the reset reached the client was in flight on a dead
    # connection too. Nothing sent after the client saw the first failure may fail (it waits for a ready
    # connection to the other replica).
    known = max(killed_by, min((end for _, end, _ in result["failed"]), default=killed_by))
    for start, end, kind in result["failed"]:
        assert kind.startswith("UNAVAILABLE"), result["errors"]
        # in flight at the kill: started before the client could know, ended after the kill began
        assert start <= known, f"a call sent {start - known:.3f}s after the client knew failed: {kind}"
        assert end >= killed_from, f"a call that ended before the kill failed: {kind}"
    assert result["ok"] == result["sent"] - len(result["failed"]), result
    wait_ready(namespace, "chaos", replicas=2)


REF_SCRIPT = """
import asyncio, json, os
from blazen_peer.client import BlazenPeerClient

SVC = os.environ["SVC"]
ROOT, CHAIN, KEY = (open(f"/tls/{{f}}", "rb").read() for f in ("ca.crt", "tls.crt", "tls.key"))

async def main():
    c = await BlazenPeerClient.connect(f"https://{{SVC}}:50051", "e2e-refs", root_certificates=ROOT,
                                       certificate_chain=CHAIN, private_key=KEY)
    if {make}:
        resp = await c.invoke_sub_workflow(
            "examples", ["examples::remember"], {{"value": "kept"}}, timeout_secs=10
        )
        ref = resp.result_value()["ref"]
        ref = ref["__blazen_session_ref__"] if isinstance(ref, dict) else ref
        origin = [d.origin_node_id for d in resp.remote_refs.values()][0]
        print(json.dumps({{"ref": ref, "origin": origin}}))
    else:
        payload = await c.deref_session_ref({ref!r})
        print(json.dumps({{"payload": payload.decode(errors="replace")}}))
    await c.close()

asyncio.run(main())
"""


def test_scale_down_removes_the_pods_without_refs_and_keeps_the_ref(operator: str, namespace: str) -> None:
    """A ref made before a scale-down 3 -> 1 is still dereferenceable afterwards: the operator set each pod's
    deletion cost from the refs it reports, so the ReplicaSet removed the two pods holding none."""
    apply(peer("keeper", replicas=3), namespace)
    wait_ready(namespace, "keeper", replicas=3)
    made = in_cluster(namespace, "keeper", REF_SCRIPT.format(make=True, ref=""))
    holder = made["origin"]
    assert holder in {p["metadata"]["name"] for p in pods(namespace, "keeper")}

    def costs() -> dict[str, str | None]:
        out = {
            p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(
                "controller.kubernetes.io/pod-deletion-cost"
            )
            for p in pods(namespace, "keeper")
        }
        return out if out[holder] == "1" and all(v == "0" for k, v in out.items() if k != holder) else {}

    wait_until("deletion costs from the pods' reports", costs, timeout=180, interval=3)
    assert status(namespace, "keeper")["sessionRefs"][holder] == 1
    kubectl("-n", namespace, "scale", "blazenpeer/keeper", "--replicas=1")
    wait_until(
        "only the holder left", lambda: [p["metadata"]["name"] for p in pods(namespace, "keeper")] == [holder]
    )
    got = in_cluster(namespace, "keeper", REF_SCRIPT.format(make=False, ref=made["ref"]))
    assert "kept" in got["payload"], got
