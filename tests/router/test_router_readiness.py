"""The router's readiness tells the truth about its pools: not ready (``/readyz`` 503, gRPC health
NOT_SERVING) until every pool has a replica that answered Describe and is ready, not ready again once a
pool has none left; ``/readyz`` and ``/v1/info`` name the pools without one."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.peers import http_get, start_peer, start_router
from tests.support.ports import free_port

from .conftest import CPU_STEPS, GPU_STEPS, build_registry


async def state(router: Any) -> tuple[int, dict, str, list[str]]:
    """``/readyz`` (status, body), gRPC health of the overall service, ``/v1/info``'s unready pools."""
    admin = f"http://127.0.0.1:{router.admin_port}"
    status, body = await http_get(f"{admin}/readyz")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc_port}") as ch:
        check = health_pb2.HealthCheckRequest(service="")
        health = await health_pb2_grpc.HealthStub(ch).Check(check, timeout=10)
    _, info = await http_get(f"{admin}/v1/info")
    serving = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
    return status, json.loads(body), serving, json.loads(info)["router"]["unready_pools"]


async def wait_for(router: Any, ready: bool, limit: float = 10.0) -> tuple[int, dict, str, list[str]]:
    t0 = time.monotonic()
    while True:
        got = await state(router)
        if (got[0] == 200) == ready or time.monotonic() - t0 > limit:
            return got
        await asyncio.sleep(0.05)


async def test_ready_only_while_every_pool_has_a_live_replica() -> None:
    reg = build_registry()
    cpu = await start_peer(reg, node_id="cpu-0", steps=CPU_STEPS, insecure=True)
    gpu_addr = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    router = await start_router(
        {"cpu": [f"127.0.0.1:{cpu.grpc_port}"], "gpu": [gpu_addr]},
        insecure=True,
        node_id="router-0",
        pool_refresh_secs=0.2,
    )
    gpu = None
    try:
        status, body, serving, unready = await state(router)
        assert (status, serving, unready) == (503, "NOT_SERVING", ["gpu"])
        assert body == {"ready": False, "reason": "pools without a live replica: gpu"}

        gpu = await start_peer(reg, node_id="gpu-0", steps=GPU_STEPS, insecure=True, grpc_addr=gpu_addr)
        status, body, serving, unready = await wait_for(router, ready=True)
        assert (status, serving, unready) == (200, "SERVING", [])
        assert body == {"ready": True, "reason": "ready"}

        await gpu.stop(grace=0)
        gpu = None
        status, body, serving, unready = await wait_for(router, ready=False)
        assert (status, serving, unready) == (503, "NOT_SERVING", ["gpu"])
        assert body["reason"] == "pools without a live replica: gpu"
    finally:
        await router.stop(grace=0)
        for p in (cpu, gpu):
            if p is not None:
                await p.stop(grace=0)


async def test_a_draining_pool_is_not_live() -> None:
    # Replicas that answer Describe but say they are not ready (draining) do not count.
    reg = build_registry()
    cpu = await start_peer(reg, node_id="cpu-0", steps=CPU_STEPS, insecure=True)
    gpu = await start_peer(reg, node_id="gpu-0", steps=GPU_STEPS, insecure=True, shutdown_admit_secs=30)
    router = await start_router(
        {"cpu": [f"127.0.0.1:{cpu.grpc_port}"], "gpu": [f"127.0.0.1:{gpu.grpc_port}"]},
        insecure=True,
        pool_refresh_secs=0.2,
    )
    stopping = None
    try:
        assert (await state(router))[0] == 200
        stopping = asyncio.ensure_future(gpu.stop(grace=30))  # not ready, still listening for 30 s
        status, _, serving, unready = await wait_for(router, ready=False)
        assert (status, serving, unready) == (503, "NOT_SERVING", ["gpu"])
        assert all(r.description is not None and not r.description.ready for r in router.pools.pools["gpu"])
    finally:
        await router.stop(grace=0)
        await cpu.stop(grace=0)
        if stopping is not None:
            stopping.cancel()
        await gpu.stop(grace=0)
