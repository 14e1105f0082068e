"""The real ``blazen`` 0.6.74 clients (gRPC ``BlazenPeerClient``, ``HttpPeerClient``) through a
``blazen-peer route`` process to real peers: Blazen's own clients speak neither TLS nor tokens on gRPC, so
the router is started as for its plaintext opt-in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.blazen_wheel import run_driver
from tests.support.peers import RouterProcess, route_process

from .conftest import Fleet, start_fleet, stop_fleet

pytestmark = pytest.mark.interop


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[tuple[Fleet, RouterProcess]]:
    fleet = await start_fleet()
    try:
        async with route_process(tmp_path, fleet.pools, "--node-id", "router-proc") as router:
            yield fleet, router
    finally:
        await stop_fleet(fleet)


async def run_blazen(shim: Path, router: RouterProcess, ops: list[dict]) -> list[dict]:
    grpc_url, http_url = f"http://127.0.0.1:{router.grpc}", f"http://127.0.0.1:{router.http}"
    return await run_driver(shim, grpc_url, http_url, "wheel-caller", ops)


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_the_blazen_wheel_through_the_router(routed, isoc23_shim: Path, transport: str) -> None:
    _, router = routed

    def invoke(workflow: str, steps: list[str] | None, input: dict | None = None) -> dict:
        return {"op": "invoke", "transport": transport, "workflow": workflow, "steps": steps, "input": input}

    ops = [
        invoke("wf", ["gpu.infer"]),
        invoke("cpu-chain", [], {"n": 4}),
        invoke("wf", ["cpu.keep"], {"data": "wheel"}),
        {"op": "deref", "transport": transport, "uuid": "$ref0"},
        {"op": "release", "transport": transport, "uuid": "$ref0"},
        {"op": "deref", "transport": transport, "uuid": "$ref0"},
        invoke("wf", ["gpu.nothing"]),
        *(invoke("wf", ["cpu.parse"]) for _ in range(40)),
    ]
    gpu, chain, keep, deref, release, gone, unknown, *spread = await run_blazen(isoc23_shim, router, ops)
    assert gpu["result"] == {"node": "gpu-0", "caller": None if transport == "grpc" else "wheel-caller"}
    assert chain["result"]["n"] == 50
    assert keep["error"] is None
    assert list(keep["refs"]) == [keep["result"]["ref"]]
    assert bytes.fromhex(deref["payload_hex"]) == b"wheel"
    assert release["released"] is True
    assert "not found" in gone["msg"]
    assert "unknown step id `gpu.nothing`" in unknown["msg"]
    nodes = [r["result"]["node"] for r in spread]
    # one client (one connection to the router), calls spread over both replicas of the pool
    assert {"cpu-0", "cpu-1"} == set(nodes), nodes
