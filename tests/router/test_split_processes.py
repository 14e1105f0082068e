"""Split runs between real ``blazen-peer`` processes, deployed as the operator deploys a token-only fleet
(#13): no TLS, the fleet's shared bearer token on every call, and the router's own token
(``--fleet-router-token-file``, the operator's ``<fleet>-router-token``) which the pools require on RunStep.
Two pools (``serve --steps``), one ``route`` process over them, and a peer serving every step as the
reference for what one peer answers."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from blazen_peer.client import BlazenPeerClient
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.fleet import RunStepRequest
from blazen_peer.wire.protocol import FLEET_ROUTER_TOKEN_METADATA, MAX_MESSAGE_BYTES, PATH_RUN_STEP

from tests.support.peers import TOKEN, spawn_peer, wait_ready
from tests.support.ports import free_port

MODULE = "split_proc_steps"
SOURCE = textwrap.dedent(
    """
    from blazen_peer import StepRegistry

    REG = StepRegistry()

    @REG.step("sp.first", accepts=["blazen::StartEvent"])
    def first(event, ctx):
        ctx.state["first"] = {"node": ctx.node_id, "pad": "a" * event.get("pad", 0)}
        return {"type": "Mid", "text": event.get("text")}

    @REG.step("sp.second", accepts=["Mid"])
    def second(event, ctx):
        pad = len(ctx.state["first"]["pad"])
        ctx.state["second"] = {"node": ctx.node_id, "pad": "b" * pad}
        result = [ctx.state["first"]["node"], ctx.node_id, event["text"]]
        return {"type": "blazen::StopEvent", "result": result}
    """
)
STEPS = ["sp.first", "sp.second"]
ROUTER_TOKEN = "router-own-9b2f6c"


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    grpc: int
    admin: int

    async def client(self, node_id: str = "caller") -> BlazenPeerClient:
        return await BlazenPeerClient.connect(f"http://127.0.0.1:{self.grpc}", node_id, token=TOKEN)


@dataclass
class TokenFleet:
    cpu: Proc
    gpu: Proc
    everything: Proc  # one peer serving every step: what an unsplit run answers
    router: Proc


async def _spawn(
    work: Path, command: str, *args: str, log: str, ports: tuple[int, int] | None = None
) -> Proc:
    """``blazen-peer COMMAND`` of the token-only fleet, on ``ports`` (gRPC, admin; default: free ones)."""
    grpc_port, admin = ports if ports is not None else (free_port(), free_port())
    common = [
        "--insecure",
        "--token-file",
        str(work / "token"),
        "--fleet-router-token-file",
        str(work / "router-token"),
        "--grpc-addr",
        f"127.0.0.1:{grpc_port}",
        "--admin-addr",
        f"127.0.0.1:{admin}",
    ]
    proc = await spawn_peer(work, [*common, *args], log_name=log, command=command)
    return Proc(proc, grpc_port, admin)


def fleet_workdir(tmp_path: Path, module: str, source: str) -> Path:
    """The working directory of a process-level fleet: the step module, the shared token and the router's."""
    work = tmp_path / "work"
    work.mkdir()
    (work / f"{module}.py").write_text(source)
    (work / "token").write_text(f"{TOKEN}\n")
    (work / "router-token").write_text(f"{ROUTER_TOKEN}\n")
    return work


@pytest.fixture
async def token_fleet(tmp_path: Path) -> AsyncIterator[TokenFleet]:
    work = fleet_workdir(tmp_path, MODULE, SOURCE)
    entry = ["--entrypoint", f"{MODULE}:REG"]
    procs: list[Proc] = []
    try:
        for node, steps in (("cpu-0", "sp.first"), ("gpu-0", "sp.second"), ("all-0", ",".join(STEPS))):
            procs.append(
                await _spawn(work, "serve", *entry, "--node-id", node, "--steps", steps, log=f"{node}.log")
            )
        cpu, gpu, everything = procs
        pools = ["--pool", f"cpu=127.0.0.1:{cpu.grpc}", "--pool", f"gpu=127.0.0.1:{gpu.grpc}"]
        procs.append(await _spawn(work, "route", "--node-id", "router-0", *pools, log="router.log"))
        for p in procs:
            await wait_ready(p.admin, p.proc)
        yield TokenFleet(cpu, gpu, everything, procs[-1])
    finally:
        for p in procs:
            if p.proc.returncode is None:
                p.proc.terminate()
                await p.proc.wait()


async def test_a_token_only_fleet_splits_a_run(token_fleet: TokenFleet) -> None:
    client = await token_fleet.router.client()
    try:
        resp = await client.invoke_sub_workflow("wf", STEPS, {"text": "hello"})
    finally:
        await client.close()
    assert resp.error is None
    assert resp.result_value() == ["cpu-0", "gpu-0", "hello"]
    assert resp.state_values() == {
        "first": {"node": "cpu-0", "pad": ""},
        "second": {"node": "gpu-0", "pad": ""},
    }


async def test_the_shared_token_alone_cannot_run_a_step(token_fleet: TokenFleet) -> None:
    """Every caller holds the fleet's bearer token; only the router holds its own: a caller presenting the
    bearer token (and the bearer token again as the router's) is refused RunStep on a pool."""
    request = wrap(
        RunStepRequest(
            str(uuid.uuid4()), "wf", "sp.first", b'{"type":"blazen::StartEvent","text":"x"}', {}
        ).encode()
    )
    bearer = ("authorization", f"Bearer {TOKEN}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{token_fleet.cpu.grpc}") as ch:
        for extra in ([], [(FLEET_ROUTER_TOKEN_METADATA, f"Bearer {TOKEN}")]):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(PATH_RUN_STEP)(request, metadata=[bearer, *extra], timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not the fleet router" in (err.value.details() or "")
        # the router's token gets in: the refusals above were about the identity, not the request
        ok = await ch.unary_unary(PATH_RUN_STEP)(
            request, metadata=[bearer, (FLEET_ROUTER_TOKEN_METADATA, f"Bearer {ROUTER_TOKEN}")], timeout=10
        )
        assert isinstance(ok, bytes)


async def test_a_split_run_too_large_to_answer_gets_the_peers_error(token_fleet: TokenFleet) -> None:
    """Every hop fits the message limit (each step adds 2.5 MB of state), the whole answer does not: the
    caller gets what one peer answers for the same run - OK with the "response too large" error - not a
    failed transport."""
    pad = MAX_MESSAGE_BYTES * 5 // 8
    answers = []
    for target in (token_fleet.everything, token_fleet.router):
        client = await target.client()
        try:
            answers.append(await client.invoke_sub_workflow("wf", STEPS, {"text": "big", "pad": pad}))
        finally:
            await client.close()
    one, split = answers
    assert one.error is not None
    assert one.error.startswith("response too large: ")
    assert split.error == one.error
    assert (split.state_json, split.result_json, split.remote_refs) == ({}, None, {})
