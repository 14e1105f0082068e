"""A fleet on loopback for the router tests: real peers (``BlazenPeerServer``, in this process) in two pools,
``cpu`` (two replicas) and ``gpu`` (one), serving different steps of one registry, and a router over them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from blazen_peer import BlazenPeerServer, RefLifetime, StepRegistry, Workflow
from blazen_peer.admin.logs import current_request_id
from blazen_peer.client import BlazenPeerClient
from blazen_peer.router import BlazenRouterServer

from tests.support.peers import TOKEN, start_peer, start_router
from tests.support.pki import Pki

CPU_STEPS = ("cpu.parse", "cpu.rid", "cpu.chain1", "cpu.chain2", "cpu.keep", "cpu.slow", "shared.echo")
GPU_STEPS = ("gpu.infer", "gpu.keep", "shared.echo", "gpu.late")  # gpu.late: registered by a test


def build_registry() -> StepRegistry:
    reg = StepRegistry()

    def where(ctx: Any, **more: Any) -> dict:
        return {
            "type": "blazen::StopEvent",
            "result": {"node": ctx.node_id, "caller": ctx.caller_node_id, **more},
        }

    @reg.step("cpu.parse")
    async def parse(event: dict, ctx: Any) -> dict:
        return where(ctx, x=event.get("x"))

    @reg.step("cpu.rid")
    async def rid(event: dict, ctx: Any) -> dict:
        return where(ctx, request_id=current_request_id())

    @reg.step("gpu.infer")
    async def infer(event: dict, ctx: Any) -> dict:
        return where(ctx)

    @reg.step("shared.echo")
    async def echo(event: dict, ctx: Any) -> dict:
        return where(ctx)

    @reg.step("cpu.slow")
    async def slow(event: dict, ctx: Any) -> dict:
        await asyncio.sleep(event.get("secs", 0.05))
        return where(ctx)

    for pool in ("cpu", "gpu"):

        @reg.step(f"{pool}.keep")
        async def keep(event: dict, ctx: Any) -> dict:
            h = ctx.session_refs.insert(
                event["data"].encode(), type_tag="Blob", lifetime=RefLifetime.UntilExplicitDrop
            )
            return where(ctx, ref=h.uuid)

    async def chain1(event: dict, ctx: Any) -> dict:
        return {"type": "Mid", "n": event.get("n", 0) + 1}

    async def chain2(event: dict, ctx: Any) -> dict:
        return where(ctx, n=event["n"] * 10)

    wf = Workflow("cpu-chain", registry=reg)
    wf.add_step("cpu.chain1", ["blazen::StartEvent"], chain1)
    wf.add_step("cpu.chain2", ["Mid"], chain2)
    Workflow("gpu-flow", registry=reg).add_step("gpu.infer", ["blazen::StartEvent"], infer)
    return reg


@dataclass
class Fleet:
    cpu: list[BlazenPeerServer]
    gpu: list[BlazenPeerServer]
    router: BlazenRouterServer
    extra: list[Any] = field(default_factory=list)

    @property
    def pools(self) -> dict[str, list[str]]:
        return {
            "cpu": [f"127.0.0.1:{p.grpc_port}" for p in self.cpu],
            "gpu": [f"127.0.0.1:{p.grpc_port}" for p in self.gpu],
        }

    async def client(self, node_id: str = "caller-1", **kw: Any) -> BlazenPeerClient:
        return await BlazenPeerClient.connect(f"http://127.0.0.1:{self.router.grpc_port}", node_id, **kw)

    def cpu_in_use(self) -> int:
        """Calls running on the cpu pool's replicas (their admission's slots)."""
        return sum(p.runtime.limiter.in_use for p in self.cpu)

    async def wait_cpu_in_use(self, n: int, secs: float = 5.0) -> int:
        """Waits up to ``secs`` for ``n`` calls running on the cpu pool; returns the count then."""
        deadline = time.monotonic() + secs
        # the peers' admission has no event to wait on: poll it
        while self.cpu_in_use() != n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.cpu_in_use()


def tls_config(pki: Pki) -> dict[str, Any]:
    """Server settings for TLS with client certificates from ``pki`` and the tests' token."""
    return {
        "tls_cert": pki.cert,
        "tls_key": pki.key,
        "tls_ca": pki.ca_file,
        "token": TOKEN,
        "insecure": False,
    }


async def start_fleet(peer_config: dict[str, Any] | None = None, **router_config: Any) -> Fleet:
    reg = build_registry()
    cfg = {"insecure": True, **(peer_config or {})}
    cpu = [await start_peer(reg, node_id=f"cpu-{i}", steps=CPU_STEPS, **cfg) for i in range(2)]
    gpu = [await start_peer(reg, node_id="gpu-0", steps=GPU_STEPS, **cfg)]
    pools = {
        "cpu": [f"127.0.0.1:{p.grpc_port}" for p in cpu],
        "gpu": [f"127.0.0.1:{p.grpc_port}" for p in gpu],
    }
    router = await start_router(pools, **{"insecure": True, "node_id": "router-0", **router_config})
    return Fleet(cpu, gpu, router)


async def stop_fleet(fleet: Fleet) -> None:
    await fleet.router.stop(grace=0)
    for p in [*fleet.cpu, *fleet.gpu]:
        await p.stop(grace=0)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = await start_fleet()
    try:
        yield f
    finally:
        await stop_fleet(f)
