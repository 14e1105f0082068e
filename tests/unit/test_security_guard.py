"""Drain, limits and metrics as call guards on a real grpc.aio server and an aiohttp app."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blazen_peer.admin.metrics import PeerMetrics
from blazen_peer.security.drain import Drainer
from blazen_peer.security.guard import AioGuardInterceptor, make_guard_middleware
from blazen_peer.security.limits import ConcurrencyLimiter

INVOKE = "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow"
DEREF = "/blazen.peer.v1.BlazenPeer/DerefSessionRef"
IN_FLIGHT = "blazen_peer_in_flight_calls"


def _sample(metrics: PeerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_grpc_aio_guards():
    gate = asyncio.Event()
    started = asyncio.Event()

    async def invoke(req, ctx):
        started.set()
        await gate.wait()
        return b"ok"

    async def deref(req, ctx):
        ctx.set_code(grpc.StatusCode.NOT_FOUND)
        ctx.set_details("session ref x not found")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "blazen.peer.v1.BlazenPeer",
        {
            "InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(invoke),
            "DerefSessionRef": grpc.unary_unary_rpc_method_handler(deref),
        },
    )
    drainer = Drainer(grace_period=5)
    limiter = ConcurrencyLimiter(1)
    metrics = PeerMetrics()
    server = grpc.aio.server(interceptors=[AioGuardInterceptor([drainer, metrics.guard("grpc"), limiter])])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = asyncio.ensure_future(ch.unary_unary(INVOKE)(b"x"))
            await asyncio.wait_for(started.wait(), 5)
            assert drainer.in_flight == 1
            assert _sample(metrics, IN_FLIGHT, transport="grpc", method="InvokeSubWorkflow") == 1
            # Over the concurrency limit: refused at once.
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(INVOKE)(b"y")
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 1" in ei.value.details()
            # Deref is not limited; its NOT_FOUND code is what the metrics record.
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(DEREF)(b"z")
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            # Drain: new calls refused, the in-flight one finishes.
            drain = asyncio.create_task(drainer.drain())
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(DEREF)(b"z")
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ei.value.details().startswith("draining")
            assert not drain.done()
            gate.set()
            assert await call == b"ok"
            assert await asyncio.wait_for(drain, 5) is True
    finally:
        await server.stop(None)

    assert limiter.in_use == 0
    assert drainer.in_flight == 0
    calls = "blazen_peer_calls_total"
    assert _sample(metrics, calls, transport="grpc", method="InvokeSubWorkflow", code="OK") == 1
    assert (
        _sample(metrics, calls, transport="grpc", method="InvokeSubWorkflow", code="RESOURCE_EXHAUSTED") == 1
    )
    assert _sample(metrics, calls, transport="grpc", method="DerefSessionRef", code="NOT_FOUND") == 1
    assert _sample(metrics, "blazen_peer_in_flight_calls", transport="grpc", method="InvokeSubWorkflow") == 0
    count = _sample(
        metrics, "blazen_peer_call_duration_seconds_count", transport="grpc", method="InvokeSubWorkflow"
    )
    assert count == 2


async def test_aiohttp_guards():
    drainer = Drainer(grace_period=1)
    limiter = ConcurrencyLimiter(1)
    metrics = PeerMetrics()
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def invoke(request):
        entered.set()
        await gate.wait()
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[make_guard_middleware([drainer, metrics.guard("http"), limiter])])
    app.router.add_post("/v1/peer/invoke_sub_workflow", invoke)
    async with TestClient(TestServer(app)) as client:
        first = asyncio.create_task(client.post("/v1/peer/invoke_sub_workflow", json={}))
        await asyncio.wait_for(entered.wait(), 5)
        r = await client.post("/v1/peer/invoke_sub_workflow", json={})
        assert r.status == 429
        assert "limit of 1" in (await r.json())["error"]
        drainer.begin()
        r = await client.post("/v1/peer/invoke_sub_workflow", json={})
        assert r.status == 503
        assert (await r.json())["error"].startswith("draining")
        r = await client.get("/nope")  # unguarded paths still get answered normally
        gate.set()
        assert (await first).status == 200
    calls = "blazen_peer_calls_total"
    assert _sample(metrics, calls, transport="http", method="InvokeSubWorkflow", code="200") == 1
    assert _sample(metrics, calls, transport="http", method="InvokeSubWorkflow", code="429") == 1


async def test_recommended_interceptor_order_counts_unauthenticated_calls_without_taking_a_slot():
    from blazen_peer.security.auth import AioTokenAuthInterceptor, TokenSource

    async def invoke(req, ctx):
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "blazen.peer.v1.BlazenPeer", {"InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(invoke)}
    )
    drainer, limiter, metrics = Drainer(), ConcurrencyLimiter(1), PeerMetrics()
    seen = []

    class Spy:
        def enter(self, method):
            seen.append(limiter.in_use)

        def exit(self, state, code):
            pass

    server = grpc.aio.server(
        interceptors=[
            AioGuardInterceptor([drainer, metrics.guard("grpc")]),
            AioTokenAuthInterceptor(TokenSource(token="t0ken")),
            AioGuardInterceptor([limiter, Spy()]),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await ch.unary_unary(INVOKE)(b"x")
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert seen == []  # the limiter never saw the unauthenticated call
            assert await ch.unary_unary(INVOKE)(b"x", metadata=[("authorization", "Bearer t0ken")]) == b"ok"
            assert seen == [1]
    finally:
        await server.stop(None)
    labels = {"transport": "grpc", "method": "InvokeSubWorkflow"}
    assert _sample(metrics, "blazen_peer_calls_total", code="UNAUTHENTICATED", **labels) == 1
    assert _sample(metrics, "blazen_peer_calls_total", code="OK", **labels) == 1
    assert limiter.in_use == 0
    assert drainer.in_flight == 0
