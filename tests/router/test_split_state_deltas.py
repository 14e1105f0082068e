"""State deltas of split runs between real processes (#13 item 5): a CPU -> GPU -> CPU run whose state is
large. The CPU replica keeps the run's state after the first step, so the third step (back on it) carries
only what the GPU step changed; whatever happens to that kept state (the replica restarted, its budget too
small), the run answers exactly what one peer serving every step answers."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blazen_peer.client import BlazenPeerClient

from tests.router.test_split_processes import ROUTER_TOKEN, Proc, _spawn, fleet_workdir
from tests.support.peers import http_get, metric, start_peer, start_router, wait_ready

MODULE = "split_delta_steps"
SOURCE = textwrap.dedent(
    """
    import os
    import time

    from blazen_peer import StepRegistry

    REG = StepRegistry()

    @REG.step("sd.first", accepts=["blazen::StartEvent"])
    def first(event, ctx):
        ctx.state["big"] = "a" * event["size"]
        ctx.state["n"] = 1
        ctx.state["tmp"] = "gone after the gpu step"
        return {"type": "Mid", "wait": event.get("wait")}

    @REG.step("sd.second", accepts=["Mid"])
    def second(event, ctx):
        if event["wait"]:  # the test restarts the cpu replica meanwhile
            limit = time.monotonic() + 60
            while not os.path.exists(event["wait"]) and time.monotonic() < limit:
                time.sleep(0.02)
        ctx.state["n"] += 1
        ctx.state["gpu"] = {"saw": len(ctx.state["big"])}
        del ctx.state["tmp"]
        return {"type": "Back"}

    @REG.step("sd.third", accepts=["Back"])
    def third(event, ctx):
        ctx.state["n"] += 1
        big = ctx.state["big"]
        return {"type": "blazen::StopEvent", "result": [len(big), big[:3], ctx.state["n"], sorted(ctx.state)]}
    """
)
STEPS = ["sd.first", "sd.second", "sd.third"]
SIZE = 1_000_000


@dataclass
class Fleet:
    work: Path
    cpu: Proc
    cpu_args: list[str]
    gpu: Proc
    everything: Proc
    router: Proc
    procs: list[Proc]  # all it started, stopped at the end


async def _fleet(tmp_path: Path, *cpu_extra: str) -> AsyncIterator[Fleet]:
    work = fleet_workdir(tmp_path, MODULE, SOURCE)
    entry = ["--entrypoint", f"{MODULE}:REG"]
    cpu_args = [*entry, "--node-id", "cpu-0", "--steps", "sd.first,sd.third", *cpu_extra]
    procs: list[Proc] = []
    try:
        procs.append(await _spawn(work, "serve", *cpu_args, log="cpu-0.log"))
        procs.append(
            await _spawn(work, "serve", *entry, "--node-id", "gpu-0", "--steps", "sd.second", log="g.log")
        )
        procs.append(
            await _spawn(work, "serve", *entry, "--node-id", "all-0", "--steps", ",".join(STEPS), log="a.log")
        )
        cpu, gpu, everything = procs
        pools = ["--pool", f"cpu=127.0.0.1:{cpu.grpc}", "--pool", f"gpu=127.0.0.1:{gpu.grpc}"]
        procs.append(await _spawn(work, "route", "--node-id", "router-0", *pools, log="router.log"))
        for p in procs:
            await wait_ready(p.admin, p.proc)
        yield Fleet(work, cpu, cpu_args, gpu, everything, procs[-1], procs)
    finally:
        for p in procs:
            if p.proc.returncode is None:
                p.proc.terminate()
                await p.proc.wait()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    async for f in _fleet(tmp_path):
        yield f


@pytest.fixture
async def small_budget(tmp_path: Path) -> AsyncIterator[Fleet]:
    async for f in _fleet(tmp_path, "--split-state-cache-bytes", str(SIZE // 2)):
        yield f


async def _run(target: Proc, wait: str | None = None) -> Any:
    client = await target.client()
    try:
        return await client.invoke_sub_workflow("wf", STEPS, {"size": SIZE, "wait": wait}, timeout_secs=60)
    finally:
        await client.close()


async def _split_info(router: Proc) -> dict[str, Any]:
    _, body = await http_get(f"http://127.0.0.1:{router.admin}/v1/info")
    return json.loads(body)["router"]["split"]


async def _same_as_one_peer(fleet: Fleet, split: Any) -> None:
    one = await _run(fleet.everything)
    assert one.error is None
    assert split.error is None
    assert split.result_value() == one.result_value() == [SIZE, "aaa", 3, ["big", "gpu", "n"]]
    assert split.state_json == one.state_json  # the very bytes
    assert split.remote_refs == one.remote_refs == {}


async def _answers(peer: Proc, method: str, code: str = "OK") -> float:
    _, text = await http_get(f"http://127.0.0.1:{peer.admin}/metrics")
    return metric(text, "blazen_peer_calls_total", transport="grpc", method=method, code=code) or 0.0


async def test_the_third_hop_carries_only_the_delta(fleet: Fleet) -> None:
    split = await _run(fleet.router)
    await _same_as_one_peer(fleet, split)
    info = await _split_info(fleet.router)
    # hop 1: the empty state; hop 2 (gpu): the whole 1 MB state; hop 3 (back on cpu): n, gpu, and "tmp" gone
    assert info["state_sends"] == {"whole": 2, "delta": 1}
    assert info["state_bytes"]["whole"] > SIZE
    assert info["state_bytes"]["delta"] < 100
    assert await _answers(fleet.cpu, "RunStep") == 2
    # both replicas kept the state after their steps, until the run's EndRun, sent after the answer
    for peer in (fleet.cpu, fleet.gpu):
        for _ in range(100):
            if await _answers(peer, "EndRun") == 1:
                break
            await asyncio.sleep(0.05)
        assert await _answers(peer, "EndRun") == 1


async def test_a_restarted_replica_gets_the_whole_state_again(fleet: Fleet) -> None:
    """The cpu replica restarts while the gpu step runs: the delta it is sent is refused (it holds nothing),
    the step goes again with whole state, the run answers what one peer answers."""
    go = fleet.work / "go"
    run = asyncio.ensure_future(_run(fleet.router, wait=str(go)))
    try:
        for _ in range(600):  # the first hop answered, the second went out: the gpu step waits
            if (await _split_info(fleet.router))["state_sends"].get("whole") == 2:
                break
            await asyncio.sleep(0.05)
        assert (await _split_info(fleet.router))["state_sends"] == {"whole": 2}
        fleet.cpu.proc.terminate()
        await fleet.cpu.proc.wait()
        fleet.cpu = await _spawn(
            fleet.work, "serve", *fleet.cpu_args, log="cpu-0b.log", ports=(fleet.cpu.grpc, fleet.cpu.admin)
        )
        fleet.procs.append(fleet.cpu)
        await wait_ready(fleet.cpu.admin, fleet.cpu.proc)
        go.write_text("")
        split = await asyncio.wait_for(run, 60)
    finally:
        go.write_text("")
    await _same_as_one_peer(fleet, split)
    info = await _split_info(fleet.router)
    assert info["state_sends"] == {"whole": 3, "delta": 1}
    # on the restarted replica: the delta refused before running, then the step with whole state
    assert await _answers(fleet.cpu, "RunStep", "FAILED_PRECONDITION") == 1
    assert await _answers(fleet.cpu, "RunStep") == 1


async def test_a_state_beyond_the_budget_travels_whole(small_budget: Fleet) -> None:
    split = await _run(small_budget.router)
    await _same_as_one_peer(small_budget, split)
    info = await _split_info(small_budget.router)
    assert info["state_sends"] == {"whole": 3}
    assert info["state_bytes"]["whole"] > 2 * SIZE


async def test_the_next_step_goes_to_the_replica_holding_the_state(tmp_path: Path) -> None:
    """Two cpu replicas: the third step of every run goes to the one that ran the first (and kept the
    state), not to a random one - no delta is refused, no state resent. In-process peers: the same steps."""
    token = tmp_path / "router-token"
    token.write_text(f"{ROUTER_TOKEN}\n")
    ns: dict[str, Any] = {}
    exec(compile(SOURCE, MODULE, "exec"), ns)  # the steps of the processes above, in this process
    cfg = {"insecure": True, "fleet_router_token_file": str(token)}
    cpu = [
        await start_peer(ns["REG"], node_id=f"cpu-{i}", steps=["sd.first", "sd.third"], **cfg) for i in (0, 1)
    ]
    gpu = await start_peer(ns["REG"], node_id="gpu-0", steps=["sd.second"], **cfg)
    pools = {"cpu": [f"127.0.0.1:{p.grpc_port}" for p in cpu], "gpu": [f"127.0.0.1:{gpu.grpc_port}"]}
    router = await start_router(pools, node_id="router-0", **cfg)
    try:
        client = await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "caller")
        try:
            for _ in range(8):
                resp = await client.invoke_sub_workflow("wf", STEPS, {"size": SIZE, "wait": None})
                assert resp.result_value() == [SIZE, "aaa", 3, ["big", "gpu", "n"]]
        finally:
            await client.close()
        assert router.split is not None
        assert router.split.info()["state_sends"] == {"whole": 16, "delta": 8}
    finally:
        await router.stop(grace=0)
        for p in [*cpu, gpu]:
            await p.stop(grace=0)
