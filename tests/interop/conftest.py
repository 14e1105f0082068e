"""Our server in the test process; the real ``blazen`` client in a subprocess (blazen_driver.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from blazen_peer import BlazenPeerServer, RefLifetime, StepRegistry, Workflow

from tests.support.blazen_wheel import run_driver
from tests.support.peers import running_peer

NODE_ID = "peer-under-test"


class FileHandle:
    """A value with ``__blazen_serialize__``: returned in a result, it becomes a session ref."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __blazen_serialize__(self) -> bytes:
        return self.path.encode()


def build_registry(finished: list[str]) -> StepRegistry:
    reg = StepRegistry()

    @reg.step("echo", accepts=["blazen::StartEvent"])
    async def echo(event: dict, ctx: Any) -> dict:
        data = {k: v for k, v in event.items() if k != "type"}
        return {"type": "blazen::StopEvent", "result": data}

    @reg.step("stateful")
    async def stateful(event: dict, ctx: Any) -> dict:
        ctx.state["count"] = 42
        ctx.state["who"] = "é"
        return {"type": "blazen::StopEvent", "result": None}

    @reg.step("chain::a")
    async def chain_a(event: dict, ctx: Any) -> dict:
        return {"type": "Mid", "trail": ["a"], "n": event["n"] + 1}

    @reg.step("chain::b", accepts=["Mid"])
    def chain_b(event: dict, ctx: Any) -> dict:  # a plain def, run off the loop
        return {"type": "Late", "trail": [*event["trail"], "b"], "n": event["n"] * 10}

    @reg.step("chain::c", accepts=["Late"])
    async def chain_c(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": {"trail": [*event["trail"], "c"], "n": event["n"]}}

    @reg.step("refs::make")
    async def refs_make(event: dict, ctx: Any) -> dict:
        kept = ctx.session_refs.insert(
            b"\x00\x01hello\xff", type_tag="Blob", lifetime=RefLifetime.UntilParentFinish
        )
        ctx.session_refs.insert(b"scratch", type_tag="Scratch")  # UntilContextDrop: gone after the run
        return {"type": "blazen::StopEvent", "result": {"kept": kept, "file": FileHandle("/data/x.bin")}}

    @reg.step("boom")
    async def boom(event: dict, ctx: Any) -> None:
        raise ValueError("kaboom")

    @reg.step("slow")
    async def slow(event: dict, ctx: Any) -> dict:
        await asyncio.sleep(2.0)
        finished.append("slow")
        return {"type": "blazen::StopEvent", "result": "late"}

    @reg.step("whoami")
    async def whoami(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": {"caller": ctx.caller_node_id, "node": ctx.node_id}}

    @reg.step("orphan")
    async def orphan(event: dict, ctx: Any) -> dict:
        return {"type": "NobodyListens"}

    wf = Workflow("echo-pipeline", registry=reg)
    wf.add_step("chain::a", ["blazen::StartEvent"], chain_a)
    wf.add_step("chain::b", ["Mid"], chain_b)
    wf.add_step("chain::c", ["Late"], chain_c)
    return reg


class Peer:
    def __init__(self, server: BlazenPeerServer, finished: list[str]) -> None:
        self.server = server
        self.finished = finished

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    finished: list[str] = []
    async with running_peer(build_registry(finished), node_id=NODE_ID, insecure=True) as server:
        yield Peer(server, finished)


BlazenRun = Callable[..., Awaitable[list[dict]]]


@pytest.fixture
def run_blazen(isoc23_shim: Path) -> BlazenRun:
    """``await run_blazen(peer, ops)`` runs the ops with the real blazen clients in a subprocess."""

    async def run(peer: Peer, ops: list[dict], node_id: str = "interop-caller") -> list[dict]:
        return await run_driver(isoc23_shim, peer.grpc_url, peer.http_url, node_id, ops)

    return run


def now_ms() -> int:
    return int(time.time() * 1000)
