"""Routing through a real router to real peers on loopback: by step ids, by workflow name, spread over
pools that both qualify, the statuses a peer gives when nothing serves a request, and what travels with a
call (caller node id, deadline, cancellation, streams)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import pytest
from blazen_peer.client import PeerTransportError, PeerUnknownStepError, PeerWorkflowError
from blazen_peer.wire.envelope import unwrap, wrap
from blazen_peer.wire.messages import SubWorkflowRequest, SubWorkflowResponse
from blazen_peer.wire.protocol import PATH_INVOKE

from .conftest import Fleet, start_fleet, stop_fleet


async def raw_invoke(port: int, req: SubWorkflowRequest) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(PATH_INVOKE)(wrap(req.encode()), timeout=10)
    return err.value


async def test_routes_by_step_ids_and_keeps_the_caller_node_id(fleet: Fleet) -> None:
    client = await fleet.client("caller-7")
    try:
        for _ in range(6):
            cpu = (await client.invoke_sub_workflow("wf", ["cpu.parse"], {"x": 3})).result_value()
            gpu = (await client.invoke_sub_workflow("wf", ["gpu.infer"])).result_value()
            assert cpu["node"] in ("cpu-0", "cpu-1")
            assert cpu["x"] == 3
            assert gpu["node"] == "gpu-0"
            assert cpu["caller"] == gpu["caller"] == "caller-7"
    finally:
        await client.close()


async def test_the_request_id_goes_along(fleet: Fleet) -> None:
    port = fleet.router.grpc_port
    req = wrap(SubWorkflowRequest.new("wf", ["cpu.rid"]).encode())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(PATH_INVOKE)
        given = await call(req, metadata=[("x-request-id", "rid-from-caller")], timeout=10)
    assert SubWorkflowResponse.decode(unwrap(given)).result_value()["request_id"] == "rid-from-caller"


async def test_routes_an_empty_step_list_by_workflow_name(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        chain = await client.invoke_sub_workflow("cpu-chain", [], {"n": 2})
        assert chain.error is None
        assert chain.result_value()["n"] == 30
        assert chain.result_value()["node"].startswith("cpu-")
        flow = await client.invoke_sub_workflow("gpu-flow", [])
        assert flow.result_value()["node"] == "gpu-0"
    finally:
        await client.close()


async def test_a_step_both_pools_serve_is_spread_over_both(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        nodes: Counter[str] = Counter()
        for _ in range(90):
            nodes[(await client.invoke_sub_workflow("wf", ["shared.echo"])).result_value()["node"]] += 1
    finally:
        await client.close()
    assert set(nodes) == {"cpu-0", "cpu-1", "gpu-0"}, nodes


async def test_unserved_steps_get_not_found_as_from_a_peer(fleet: Fleet) -> None:
    port = fleet.router.grpc_port
    assert port is not None
    peer_port = fleet.cpu[0].grpc_port
    assert peer_port is not None
    # one unknown id: the router's answer is the peer's, word for word
    req = SubWorkflowRequest.new("wf", ["cpu.parse", "nope"])
    via_router, via_peer = await raw_invoke(port, req), await raw_invoke(peer_port, req)
    assert via_router.code() == via_peer.code() == grpc.StatusCode.NOT_FOUND
    assert via_router.details() == via_peer.details() == "unknown step id `nope`"
    # several: all named
    err = await raw_invoke(port, SubWorkflowRequest.new("wf", ["nope", "cpu.parse", "nada"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "unknown step ids `nope`, `nada`: no pool serves them"
    # each served, but by different pools: no single pool can run them together
    err = await raw_invoke(port, SubWorkflowRequest.new("wf", ["cpu.parse", "gpu.infer"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "`cpu.parse` in cpu; `gpu.infer` in gpu" in err.details()
    # an empty step list for a workflow no pool has: INTERNAL, as a peer answers
    req = SubWorkflowRequest.new("no-such-workflow", [])
    via_router, via_peer = await raw_invoke(port, req), await raw_invoke(peer_port, req)
    assert via_router.code() == via_peer.code() == grpc.StatusCode.INTERNAL
    assert via_router.details() == via_peer.details()
    # a newer envelope: FAILED_PRECONDITION before any routing, as a peer checks it first
    req = SubWorkflowRequest.new("wf", ["nope"])
    req.envelope_version = 2
    via_router, via_peer = await raw_invoke(port, req), await raw_invoke(peer_port, req)
    assert via_router.code() == via_peer.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert via_router.details() == via_peer.details()
    # malformed bytes: the peer's statuses too
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await ch.unary_unary(PATH_INVOKE)(wrap(b"\x01\x05ab"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith("postcard decode failed:")
    # and the typed client error, as against a peer
    client = await fleet.client()
    try:
        with pytest.raises(PeerUnknownStepError):
            await client.invoke_sub_workflow("wf", ["gpu.nothing"])
        with pytest.raises(PeerWorkflowError):
            await client.invoke_sub_workflow("nothing", [])
    finally:
        await client.close()


async def test_the_callers_deadline_bounds_the_hop(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerTransportError) as err:
            await client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 30}, deadline=0.5)
        assert err.value.code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - t0 < 5
    finally:
        await client.close()
    # the peer saw the hop end: nothing stays in flight there
    assert await fleet.wait_cpu_in_use(0) == 0


async def test_a_cancelled_call_cancels_the_hop(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        task = asyncio.ensure_future(client.invoke_sub_workflow("wf", ["cpu.slow"], {"secs": 30}))
        assert await fleet.wait_cpu_in_use(1) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await fleet.wait_cpu_in_use(0) == 0
    finally:
        await client.close()


async def test_streams_are_forwarded_frame_by_frame(fleet: Fleet) -> None:
    client = await fleet.client()
    try:
        items = [item async for item in client.stream_sub_workflow_events("cpu-chain", [], {"n": 1})]
    finally:
        await client.close()
    *events, final = items
    assert [e.event_type for e in events] == ["Mid", "blazen::StopEvent"]
    assert isinstance(final, SubWorkflowResponse)
    assert final.result_value()["n"] == 20


async def test_the_table_follows_what_the_pools_serve() -> None:
    # A step registered on the gpu pool while serving becomes routable at the next Describe round; a call
    # before that is NOT_FOUND, as from a peer that does not serve it.
    fleet = await start_fleet(pool_refresh_secs=0.2)
    client = await fleet.client()
    try:
        with pytest.raises(PeerUnknownStepError):
            await client.invoke_sub_workflow("wf", ["gpu.late"])
        reg = fleet.gpu[0].registry

        @reg.step("gpu.late")
        async def late(event: dict, ctx: object) -> dict:
            return {"type": "blazen::StopEvent", "result": "late"}

        for _ in range(50):
            if "gpu.late" in fleet.router.pools.table.step_pools:
                break
            await asyncio.sleep(0.1)
        assert fleet.router.pools.table.step_pools["gpu.late"] == ("gpu",)
        assert (await client.invoke_sub_workflow("wf", ["gpu.late"])).result_value() == "late"
    finally:
        await client.close()
        await stop_fleet(fleet)
