"""The HTTP/JSON shim on the router (the same shim as a peer's, in front of the forwarding), and the
router's admin: /v1/info shows the routing table, /metrics the per-pool, per-replica counters."""

from __future__ import annotations

import aiohttp
from blazen_peer.client import HttpPeerClient

from tests.support.peers import http_get, metric

from .conftest import Fleet


async def test_http_shim_routes_invoke_deref_release(fleet: Fleet) -> None:
    base = f"http://127.0.0.1:{fleet.router.http_port}"
    client = HttpPeerClient.new_http(base, "http-caller")
    try:
        gpu = await client.invoke_sub_workflow("wf", ["gpu.infer"])
        assert gpu.result_value() == {"node": "gpu-0", "caller": "http-caller"}
        chain = await client.invoke_sub_workflow("cpu-chain", [], {"n": 1})
        assert chain.result_value()["n"] == 20
        kept = await client.invoke_sub_workflow("wf", ["cpu.keep"], {"data": "over-http"})
        ref = kept.result_value()["ref"]
        assert await client.deref_session_ref(ref) == b"over-http"
        assert await client.release_session_ref(ref) is True
    finally:
        await client.close()
    async with aiohttp.ClientSession() as s:
        body = {"envelope_version": 1, "workflow_name": "wf", "step_ids": ["nope"], "input_json": list(b"{}")}
        body["timeout_secs"] = None
        async with s.post(f"{base}/v1/peer/invoke_sub_workflow", json=body) as r:
            assert r.status == 404
            assert await r.json() == {"error": "unknown step id `nope`"}
        async with s.post(
            f"{base}/v1/peer/deref_session_ref",
            json={"envelope_version": 1, "ref_uuid": "0" * 8 + "-0000-4000-8000-" + "0" * 12},
        ) as r:
            assert r.status == 404


async def test_info_shows_the_routing_table_and_metrics_count_per_replica(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        for _ in range(10):
            await client.invoke_sub_workflow("wf", ["gpu.infer"])
    finally:
        await client.close()
    admin = f"http://127.0.0.1:{fleet.router.admin_port}"
    async with aiohttp.ClientSession() as s, s.get(f"{admin}/v1/info") as r:
        info = await r.json()
    routes = info["router"]["routes"]
    assert routes["steps"]["gpu.infer"] == ["gpu"]
    assert routes["steps"]["shared.echo"] == ["cpu", "gpu"]
    assert routes["workflows"] == {"cpu-chain": ["cpu"], "gpu-flow": ["gpu"]}
    gpu = info["router"]["pools"]["gpu"]["replicas"]
    assert [(r["node_id"], r["calls"], r["up"]) for r in gpu] == [("gpu-0", 10, True)]
    status, text = await http_get(f"{admin}/metrics")
    assert status == 200
    addr = fleet.pools["gpu"][0]
    assert metric(text, "blazen_router_replica_calls_total", pool="gpu", replica=addr) == 10
    assert metric(text, "blazen_router_replica_errors_total", pool="gpu", replica=addr) == 0
    assert metric(text, "blazen_router_replica_in_flight_calls", pool="gpu", replica=addr) == 0
    # the router's own admission counted the calls as a peer's does
    assert (
        metric(text, "blazen_peer_calls_total", transport="grpc", method="InvokeSubWorkflow", code="OK") == 10
    )


async def test_peers_count_describe_calls_by_their_method_name(fleet: Fleet) -> None:
    # the router described every replica once before it listened; a refresh now makes it at least twice
    await fleet.router.pools.refresh()
    status, text = await http_get(f"http://127.0.0.1:{fleet.gpu[0].admin_port}/metrics")
    assert status == 200
    described = metric(text, "blazen_peer_calls_total", transport="grpc", method="Describe", code="OK")
    assert described is not None
    assert described >= 2
    assert metric(text, "blazen_peer_calls_total", transport="grpc", method="other") is None
