"""``blazen-peer route --fleet`` against the real kube-apiserver: a router process, authenticated with a
ServiceAccount token bound to exactly the contract's read-only Role, discovers its pools from BlazenPeers and
EndpointSlices (created by hand, pointing at real peers) with watches, follows every change, and keeps
routing - then catches up - when its connection to the API stalls or the API goes away.

The EndpointSlices carry our own ``endpointslice.kubernetes.io/managed-by`` and belong to no Service, so the
controller manager leaves them alone. The API refuses loopback endpoint addresses, so the peers listen on
one of this machine's own non-loopback IPv4 addresses (a fresh machine may have just one), told apart by
port: an EndpointSlice has one port list for all its endpoints, so each port gets its own slice, as a
Service's slices would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from blazen_operator.apply import Api, ApiError
from blazen_peer import BlazenPeerServer, StepRegistry
from blazen_peer.client import BlazenPeerClient, PeerError

from tests.support import controlplane
from tests.support.peers import blazen_peer_command, http_get, metric, start_peer, wait_ready
from tests.support.pki import CA
from tests.support.ports import free_port
from tests.support.tcpproxy import FreezableProxy

pytestmark = pytest.mark.api
T = TypeVar("T")

FLEET = "f"
MANAGER = "blazen-tests.by-hand"


def local_ipv4() -> str:
    """One of this machine's own IPv4 addresses that is not loopback (the peers' endpoint address)."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout
    addrs = [f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4]]
    found = [a for a in addrs if not a.startswith("127.")]
    assert found, f"the test needs a non-loopback IPv4 address on this machine, has only {addrs}"
    return found[0]


def registry() -> StepRegistry:
    reg = StepRegistry()
    for sid in ("cpu.work", "gpu.infer"):

        @reg.step(sid)
        async def where(event: dict, ctx: Any) -> dict:
            return {"type": "blazen::StopEvent", "result": {"node": ctx.node_id}}

    return reg


async def until(check: Callable[[], Any], limit: float = 30, what: str = "") -> Any:
    """Await ``check()`` (sync, run in a thread, or a coroutine function) until truthy; the in-process peers
    keep serving meanwhile."""
    deadline = time.monotonic() + limit
    last: Any = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except (AssertionError, KeyError, LookupError, PeerError, ApiError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}: {last!r}")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------- objects
def blazen_peer(pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "blazen.dev/v1alpha1",
        "kind": "BlazenPeer",
        "metadata": {
            "name": f"{FLEET}-{pool}",
            "labels": {"blazen.dev/fleet": FLEET, "blazen.dev/pool": pool},
        },
        "spec": {"image": "example:dev", "entrypoint": "steps"},
    }


def endpoint_slice(name: str, pool: str, port: int, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "blazen.dev/fleet": FLEET,
                "blazen.dev/pool": pool,
                "endpointslice.kubernetes.io/managed-by": MANAGER,
            },
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "port": 1, "protocol": "TCP"},
            {"name": "grpc", "port": port, "protocol": "TCP"},
        ],
        "endpoints": endpoints,
    }


def ep(addr: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [addr], "conditions": conditions}


ROUTER_ROLE_RULES = [
    {"apiGroups": ["blazen.dev"], "resources": ["blazenpeers"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]


def router_identity(api: Api, ns: str, directory: Path) -> Path:
    """ServiceAccount + the contract's read-only Role + RoleBinding, and a TokenRequest token for it in a
    file (what the kubelet mounts)."""
    name = f"{FLEET}-router"
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    api.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        body={"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )
    api.request(
        "POST",
        f"{rbac}/roles",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": ROUTER_ROLE_RULES,
        },
    )
    api.request(
        "POST",
        f"{rbac}/rolebindings",
        body={
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        },
    )
    token = api.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts/{name}/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        },
    )["status"]["token"]
    path = directory / "token"
    path.write_text(token)
    return path


# ---------------------------------------------------------------------------------------------- harness
@dataclass
class Harness:
    api: Api
    ns: str
    cp: controlplane.ControlPlane
    tmp: Path
    ip: str
    peers: dict[str, BlazenPeerServer] = field(default_factory=dict)
    router: asyncio.subprocess.Process | None = None
    grpc_port: int = 0
    admin_port: int = 0

    async def peer(self, node_id: str, port: int, steps: tuple[str, ...]) -> str:
        addr = f"{self.ip}:{port}"
        self.peers[node_id] = await start_peer(
            registry(), node_id=node_id, steps=steps, insecure=True, grpc_addr=addr, http_addr=None
        )
        return addr

    def apply(self, obj: dict[str, Any]) -> None:
        group = "/apis/blazen.dev/v1alpha1" if obj["kind"] == "BlazenPeer" else "/apis/discovery.k8s.io/v1"
        plural = "blazenpeers" if obj["kind"] == "BlazenPeer" else "endpointslices"
        self.api.request(
            "PATCH",
            f"{group}/namespaces/{self.ns}/{plural}/{obj['metadata']['name']}",
            query={"fieldManager": "blazen-tests", "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def delete(self, kind: str, name: str) -> None:
        group = "/apis/blazen.dev/v1alpha1" if kind == "BlazenPeer" else "/apis/discovery.k8s.io/v1"
        plural = "blazenpeers" if kind == "BlazenPeer" else "endpointslices"
        self.api.request("DELETE", f"{group}/namespaces/{self.ns}/{plural}/{name}")

    async def start_router(self, api_port: int, token: Path, *extra: str) -> None:
        self.grpc_port, self.admin_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BLAZEN_PEER_", "KUBERNETES_"))}
        log = open(self.tmp / "router.log", "wb")  # noqa: SIM115, ASYNC230 (handed to the process)
        self.router = await asyncio.create_subprocess_exec(
            *blazen_peer_command(),
            "route",
            "--insecure",
            "--node-id",
            "router-0",
            "--grpc-addr",
            f"127.0.0.1:{self.grpc_port}",
            "--admin-addr",
            f"127.0.0.1:{self.admin_port}",
            "--fleet",
            FLEET,
            "--fleet-namespace",
            self.ns,
            "--kube-api-url",
            f"https://127.0.0.1:{api_port}",
            "--kube-token-file",
            str(token),
            "--kube-ca",
            str(self.cp.ca),
            "--pool-refresh-secs",
            "1",
            *extra,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        log.close()

    async def info(self) -> dict[str, Any]:
        status, body = await http_get(f"http://127.0.0.1:{self.admin_port}/v1/info")
        assert status == 200, body
        return json.loads(body)["router"]

    async def metrics(self) -> str:
        return (await http_get(f"http://127.0.0.1:{self.admin_port}/metrics"))[1]

    async def nodes(self, client: BlazenPeerClient, step: str, calls: int = 40) -> Counter[str]:
        out: Counter[str] = Counter()
        for _ in range(calls):
            out[(await client.invoke_sub_workflow("wf", [step])).result_value()["node"]] += 1
        return out

    async def close(self) -> None:
        if self.router is not None and self.router.returncode is None:
            self.router.terminate()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.router.wait(), 15)
            if self.router.returncode is None:
                self.router.kill()
                await self.router.wait()
        for p in self.peers.values():
            await p.stop(grace=0)

    def log(self) -> str:
        return (self.tmp / "router.log").read_text(errors="replace")[-4000:]


@pytest.fixture
async def harness(
    api: Api, namespace: str, control_plane: controlplane.ControlPlane, tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(api, namespace, control_plane, tmp_path, local_ipv4())
    try:
        yield h
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------- tests
async def test_the_router_follows_its_fleet_from_the_api(harness: Harness) -> None:
    h = harness
    ip = h.ip
    p_cpu0, p_cpu1, p_gpu, p_new = free_port(), free_port(), free_port(), free_port()
    cpu0 = await h.peer("cpu-0", p_cpu0, ("cpu.work",))
    cpu1 = await h.peer("cpu-1", p_cpu1, ("cpu.work",))
    gpu0 = await h.peer("gpu-0", p_gpu, ("gpu.infer",))
    for pool in ("cpu", "gpu", "empty"):
        h.apply(blazen_peer(pool))
    # cpu-0 is listed by two slices (both of a BlazenPeer's Services select it): one replica. cpu-1 has the
    # same address on another port, in its own slice: another replica.
    h.apply(endpoint_slice("f-cpu-a", "cpu", p_cpu0, [{"addresses": [ip]}]))
    h.apply(endpoint_slice("f-cpu-peers-a", "cpu", p_cpu0, [ep(ip, ready=True)]))
    h.apply(endpoint_slice("f-cpu-b", "cpu", p_cpu1, [ep(ip, ready=True)]))
    h.apply(endpoint_slice("f-gpu-a", "gpu", p_gpu, [ep(ip, ready=True, terminating=False)]))
    # another fleet's pool in the same namespace is none of this router's business
    other = endpoint_slice("g-cpu-a", "cpu", p_gpu, [ep(ip)])
    other["metadata"]["labels"]["blazen.dev/fleet"] = "g"
    h.apply(other)
    token = router_identity(h.api, h.ns, h.tmp)

    await h.start_router(h.cp.apiserver_port, token)
    assert h.router is not None
    await wait_ready(h.admin_port, h.router)
    info = await h.info()
    assert {p: [r["addr"] for r in v["replicas"]] for p, v in info["pools"].items()} == {
        "cpu": sorted([cpu0, cpu1]),
        "empty": [],
        "gpu": [gpu0],
    }
    # a pool with no endpoint is known and unready, and does not hold the router's readiness
    assert info["unready_pools"] == ["empty"]
    assert info["discovery"]["synced"] is True
    text = await h.metrics()
    assert metric(text, "blazen_router_pool_ready", pool="empty") == 0
    assert metric(text, "blazen_router_pool_ready", pool="cpu") == 1
    assert metric(text, "blazen_router_discovery_healthy", resource="endpointslices") == 1

    client = await BlazenPeerClient.connect(f"http://127.0.0.1:{h.grpc_port}", "caller")
    try:
        assert set(await h.nodes(client, "cpu.work")) == {"cpu-0", "cpu-1"}
        assert set(await h.nodes(client, "gpu.infer", 5)) == {"gpu-0"}

        # a new endpoint: the router uses it
        await h.peer("cpu-2", p_new, ("cpu.work",))
        added = time.monotonic()
        h.apply(endpoint_slice("f-cpu-c", "cpu", p_new, [ep(ip, ready=True)]))
        await until(
            lambda: _has(h.nodes(client, "cpu.work", 30), "cpu-2"),
            limit=10,
            what="the new replica receiving calls",
        )
        print(f"\nnew endpoint -> calls on it: {time.monotonic() - added:.2f} s", file=sys.stderr)

        # not ready, terminating: no more calls
        h.apply(endpoint_slice("f-cpu-b", "cpu", p_cpu1, [ep(ip, ready=False)]))
        h.apply(endpoint_slice("f-cpu-c", "cpu", p_new, [ep(ip, ready=True, terminating=True)]))
        await until(
            lambda: _replicas(h, "cpu", [cpu0]), what="cpu-1 (not ready) and cpu-2 (terminating) gone"
        )
        assert set(await h.nodes(client, "cpu.work")) == {"cpu-0"}

        # the BlazenPeer goes: its pool goes, even while its slices linger (the garbage collector's work)
        h.delete("BlazenPeer", "f-gpu")
        await until(lambda: _no_pool(h, "gpu"), what="pool gpu gone")
        with pytest.raises(PeerError) as err:
            await client.invoke_sub_workflow("wf", ["gpu.infer"], raise_on_error=True)
        assert "unknown step id `gpu.infer`" in str(err.value)
    finally:
        await client.close()

    # the router watched (no periodic list): one list per resource for the whole test
    text = await h.metrics()
    assert metric(text, "blazen_router_discovery_lists_total", resource="blazenpeers") == 1
    assert metric(text, "blazen_router_discovery_lists_total", resource="endpointslices") == 1
    # its token is read-only, to exactly the Role's resources
    ctx = ssl.create_default_context(cafile=str(h.cp.ca))
    headers = {"Authorization": f"Bearer {token.read_text()}"}
    base = f"{h.cp.server}/api/v1/namespaces/{h.ns}"
    assert (await http_get(f"{base}/secrets", headers=headers, ssl=ctx))[0] == 403
    assert (await http_get(f"{base}/pods", headers=headers, ssl=ctx))[0] == 403


async def _has(counter: Any, node: str) -> bool:
    return node in await counter


async def _replicas(h: Harness, pool: str, addrs: list[str]) -> bool:
    return [r["addr"] for r in (await h.info())["pools"][pool]["replicas"]] == addrs


async def _no_pool(h: Harness, pool: str) -> bool:
    return pool not in (await h.info())["pools"]


async def test_a_stalled_or_lost_api_connection_loses_no_change(harness: Harness) -> None:
    h = harness
    ip = h.ip
    port0, port1 = free_port(), free_port()
    cpu0 = await h.peer("cpu-0", port0, ("cpu.work",))
    cpu1 = await h.peer("cpu-1", port1, ("cpu.work",))
    h.apply(blazen_peer("cpu"))
    h.apply(endpoint_slice("f-cpu-a", "cpu", port0, [ep(ip)]))
    token = router_identity(h.api, h.ns, h.tmp)
    proxy = FreezableProxy(h.cp.apiserver_port)
    await h.start_router(proxy.port, token, "--kube-watch-secs", "3")
    assert h.router is not None
    client: BlazenPeerClient | None = None
    try:
        await wait_ready(h.admin_port, h.router)
        client = await BlazenPeerClient.connect(f"http://127.0.0.1:{h.grpc_port}", "caller")
        assert set(await h.nodes(client, "cpu.work", 10)) == {"cpu-0"}

        # the watches stall (a hung middlebox): routing goes on with what is known; a change made meanwhile
        # arrives once the router gave up on the stalled watches (3 s + 10 s) and watched again
        assert proxy.freeze() >= 1
        h.apply(endpoint_slice("f-cpu-b", "cpu", port1, [ep(ip)]))
        assert set(await h.nodes(client, "cpu.work", 10)) == {"cpu-0"}
        await until(
            lambda: _replicas(h, "cpu", sorted([cpu0, cpu1])), limit=40, what="the change made while stalled"
        )
        watches = (await h.info())["discovery"]["watches"]["endpointslices"]
        assert "stalled" in (watches["last_error"] or ""), watches
        assert set(await h.nodes(client, "cpu.work")) == {"cpu-0", "cpu-1"}

        # the API goes away altogether: still routing, shown in /v1/info and /metrics
        proxy.close()
        proxy_port = proxy.port
        await until(lambda: _unhealthy(h), limit=30, what="discovery unhealthy while the API is unreachable")
        assert (await http_get(f"http://127.0.0.1:{h.admin_port}/readyz"))[0] == 200  # fail static
        assert set(await h.nodes(client, "cpu.work")) == {"cpu-0", "cpu-1"}
        h.apply(
            endpoint_slice("f-cpu-a", "cpu", port0, [ep(ip, ready=False)])
        )  # made while the router cannot see
        # ... and comes back: the change is seen
        proxy = FreezableProxy(h.cp.apiserver_port, port=proxy_port)
        await until(lambda: _replicas(h, "cpu", [cpu1]), limit=60, what="the change made while unreachable")
        assert set(await h.nodes(client, "cpu.work")) == {"cpu-1"}
        assert metric(await h.metrics(), "blazen_router_discovery_healthy", resource="endpointslices") == 1
    finally:
        if client is not None:
            await client.close()
        proxy.close()
    assert h.router.returncode is None, h.log()


async def _unhealthy(h: Harness) -> bool:
    return metric(await h.metrics(), "blazen_router_discovery_healthy", resource="endpointslices") == 0


@pytest.mark.parametrize("broken", ["token", "ca"])
async def test_a_router_that_cannot_list_its_fleet_is_not_ready(harness: Harness, broken: str) -> None:
    h = harness
    token = router_identity(h.api, h.ns, h.tmp)
    ca = h.cp.ca
    if broken == "token":
        token.write_text("not-a-token")
    else:  # a CA the API server's certificate does not chain to: never talk to an impostor
        ca = h.tmp / "other-ca.crt"
        ca.write_bytes(CA("someone-else").cert_pem)
    await h.start_router(h.cp.apiserver_port, token, "--kube-ca", str(ca))
    assert h.router is not None
    why = "401" if broken == "token" else "CERTIFICATE_VERIFY_FAILED"

    async def unready() -> bool:
        status, body = await http_get(f"http://127.0.0.1:{h.admin_port}/readyz")
        return status == 503 and "not listed from the Kubernetes API yet" in body and why in body

    await until(unready, limit=40, what="a not-ready router naming why it cannot list")
    assert h.router.returncode is None, h.log()
