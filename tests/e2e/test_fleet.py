"""The BlazenFleet on the kind cluster (issues #12 and #13): examples/fleet.yaml becomes Ready, and through
its one router Service a client pod keeping ONE channel open sees GPU steps land only on the GPU node, a
CPU -> GPU -> CPU chain split over the pools with each step on its node, calls spread over the CPU pool's
replicas, a rollout of the CPU pool under >= 200 calls/s with 0 failed calls, and a replica added to a pool
receiving calls within 10 s of becoming ready.

One fleet for the module (a fleet is three Deployments and a dozen objects: building one per test would
double the suite's time); each test leaves it as it found it, apart from the pod names.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .clients import in_background, in_cluster, joined, load_spec, start_load, wait_clients_running
from .conftest import CPU_NODE, GPU_NODE, apply, kubectl, kubectl_json, wait_until
from .test_peers import pods, wait_ready

FLEET = "examples"
CPU_POOL, GPU_POOL = f"{FLEET}-cpu", f"{FLEET}-gpu"
MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"
RATE = 220

#: Runs in a client pod: CALLS calls of STEPS on one channel to the router; the last line is the JSON list of
#: (wall-clock time, result, state) per call.
CALLS_SCRIPT = """
import asyncio, json, os, time
from blazen_peer.client import BlazenPeerClient

async def main():
    tls = [open(f"/tls/{f}", "rb").read() for f in ("ca.crt", "tls.crt", "tls.key")]
    steps = json.loads(os.environ["STEPS"])
    out = []
    async with await BlazenPeerClient.connect(
        f"https://{os.environ['SVC']}:50051", "e2e-fleet",
        root_certificates=tls[0], certificate_chain=tls[1], private_key=tls[2],
    ) as c:
        end = time.time() + float(os.environ.get("SECONDS", "0"))
        n = 0
        while n < int(os.environ["CALLS"]) or time.time() < end:
            resp = await c.invoke_sub_workflow("examples", steps, json.loads(os.environ["INPUT"]), 20)
            if resp.error is not None:
                raise SystemExit("workflow error: " + str(resp.error))
            out.append([time.time(), resp.result_value(), resp.state_values()])
            n += 1
            await asyncio.sleep(float(os.environ.get("PAUSE", "0")))
    print(json.dumps(out))

asyncio.run(main())
"""


def client_secret(ns: str) -> str:
    """The caller's identity: the fleet's own client certificate (status certificate.clientSecretName, no
    pool's), once cert-manager has filled its Secret."""
    name = fleet_status(ns)["certificate"]["clientSecretName"]
    assert name == f"{FLEET}-client-tls"
    wait_until(
        f"Secret {name} issued", lambda: kubectl_json("-n", ns, "get", "secret", name)["data"]["tls.crt"]
    )
    return name


def calls(ns: str, steps: list[str], data: Any, n: int, **env: str) -> list[Any]:
    variables = {"STEPS": json.dumps(steps), "INPUT": json.dumps(data), "CALLS": str(n), **env}
    return in_cluster(ns, FLEET, CALLS_SCRIPT, env=variables, secret=client_secret(ns))


def fleet_status(ns: str) -> dict[str, Any]:
    return kubectl_json("-n", ns, "get", "blazenfleet", FLEET).get("status") or {}


def wait_fleet_ready(ns: str, timeout: float = 400) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        st = fleet_status(ns)
        return st if st.get("phase") == "Ready" else None

    return wait_until(f"BlazenFleet {ns}/{FLEET} Ready", ready, timeout=timeout, interval=3)


@pytest.fixture(scope="module")
def fleet(operator: str) -> Iterator[str]:
    """examples/fleet.yaml applied in a fresh namespace and Ready; its namespace."""
    ns = f"e2e-fleet-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["spec"]["imagePullPolicy"] = "Never"
    apply(manifest, ns)
    try:
        wait_fleet_ready(ns)
        yield ns
    finally:
        kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_the_fleet_example_is_ready_and_routes_every_step(fleet: str) -> None:
    st = fleet_status(fleet)
    pools = {p["name"]: p for p in st["pools"]}
    assert set(pools) == {"cpu", "gpu"}
    assert (pools["cpu"]["readyReplicas"], pools["gpu"]["readyReplicas"]) == (2, 1)
    assert st["routes"]["examples::gpu_info"] == ["gpu"]
    assert st["routes"]["examples::echo"] == ["cpu"]
    assert st["endpoints"]["grpc"] == f"{FLEET}.{fleet}.svc:50051"
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert (conds["Ready"], conds["Routable"], conds["Degraded"]) == ("True", "True", "False")
    # the pools are BlazenPeers of their own, owned by the fleet
    for name in (CPU_POOL, GPU_POOL):
        bp = kubectl_json("-n", fleet, "get", "blazenpeer", name)
        (owner,) = bp["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("BlazenFleet", FLEET, True)


def test_gpu_steps_through_the_router_run_only_on_the_gpu_node(fleet: str) -> None:
    results = calls(fleet, ["examples::gpu_info"], {}, 20)
    assert {r[1]["node"] for r in results} == {GPU_NODE}
    assert {r[1]["pool"] for r in results} == {"gpu"}


def test_a_cpu_gpu_cpu_chain_runs_each_step_on_its_pool(fleet: str) -> None:
    steps = ["examples::extract", "examples::embed", "examples::index"]
    (one,) = calls(fleet, steps, {"text": "route GPU steps to labelled node pools"}, 1)
    _, result, state = one
    assert result == {"indexed": 7, "longest": "labelled"}
    hops = [(h["step"], h["pool"], h["node"]) for h in state["hops"]]
    assert hops == [
        ("examples::extract", "cpu", CPU_NODE),
        ("examples::embed", "gpu", GPU_NODE),
        ("examples::index", "cpu", CPU_NODE),
    ]


def test_calls_on_one_channel_spread_over_the_pools_replicas(fleet: str) -> None:
    results = calls(fleet, ["examples::where"], {}, 200)
    served = Counter(r[1]["pod"] for r in results)
    replicas = {p["metadata"]["name"] for p in pods(fleet, CPU_POOL)}
    assert set(served) == replicas, served
    # least in-flight with sequential calls: every replica takes a fair share, none all of them
    assert all(60 <= n <= 140 for n in served.values()), served


def test_rolling_the_cpu_pool_under_load_fails_no_call(fleet: str) -> None:
    before = {p["metadata"]["name"] for p in pods(fleet, CPU_POOL)}
    spec = load_spec(fleet, FLEET, rate=RATE, seconds=90)
    t, out = start_load(fleet, FLEET, spec, secret=client_secret(fleet))
    wait_clients_running(fleet)
    patch = [{"op": "add", "path": "/spec/pools/0/env/-", "value": {"name": "E2E_ROLL", "value": "1"}}]
    kubectl("-n", fleet, "patch", "blazenfleet", FLEET, "--type=json", "-p", json.dumps(patch))

    def rolled() -> bool:
        now = {p["metadata"]["name"] for p in pods(fleet, CPU_POOL)}
        return len(now) == 2 and not (now & before)

    wait_until("the CPU pool's pods replaced", rolled, timeout=240, interval=2)
    result = joined(t, out)
    print(f"through the router: {result['sent']} sent, {result['ok']} ok, {result['errors']}")
    assert result["errors"] == {}, result
    assert result["ok"] == result["sent"] == RATE * 90, result
    wait_fleet_ready(fleet)


def _ready_since(pod: dict[str, Any]) -> float:
    (cond,) = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
    assert cond["status"] == "True"
    return dt.datetime.fromisoformat(cond["lastTransitionTime"].replace("Z", "+00:00")).timestamp()


def test_a_replica_added_to_a_pool_gets_calls_within_10_s(fleet: str) -> None:
    before = {p["metadata"]["name"] for p in pods(fleet, CPU_POOL)}
    # `where` on one channel for 90 s, ten calls a second, while the pool is scaled by hand
    t, out = in_background(
        lambda: calls(fleet, ["examples::where"], {}, 0, SECONDS="90", PAUSE="0.1"),
    )
    wait_clients_running(fleet)
    kubectl("-n", fleet, "scale", f"blazenpeer/{CPU_POOL}", "--replicas=3")
    try:
        wait_ready(fleet, CPU_POOL, replicas=3, timeout=120)
        results = joined(t, out)
        (new,) = [p for p in pods(fleet, CPU_POOL) if p["metadata"]["name"] not in before]
        name = new["metadata"]["name"]
        first = min((r[0] for r in results if r[1]["pod"] == name), default=None)
        assert first is not None, f"{name} never served a call through the router"
        # the Ready condition's time has one-second resolution
        delay = first - _ready_since(new)
        print(f"new replica {name}: first call {delay:.1f} s after it became ready")
        assert delay <= 10 + 1, delay
    finally:
        kubectl("-n", fleet, "scale", f"blazenpeer/{CPU_POOL}", "--replicas=2")
