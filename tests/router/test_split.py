"""Split runs (#13): step ids that no single pool serves run over the pools, step by step, through the router,
with one peer's semantics. Each test runs the same request (a) through a router over one pool that serves
every step and (b) through a router over two pools that each serve part of them, with real peers on loopback
that trust the router (the fleet router token: ``--fleet-router-token-file`` on both sides)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from blazen_peer import BlazenPeerServer, RefLifetime, StepRegistry
from blazen_peer.client import BlazenPeerClient, PeerTransportError, PeerUnknownStepError
from blazen_peer.router import BlazenRouterServer
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.messages import SubWorkflowEvent, SubWorkflowRequest, SubWorkflowResponse
from blazen_peer.wire.protocol import PATH_INVOKE, PATH_STREAM

from tests.support.blazen_wheel import run_driver
from tests.support.peers import http_get, metric, route_process, start_peer, start_router

A, B, C = "split.extract", "split.embed", "split.index"
STEPS = [A, B, C]


@dataclass
class Probe:
    """What the steps saw, shared with the test (the peers run in this process)."""

    cancelled: asyncio.Event
    started: asyncio.Event


def build_registry(probe: Probe) -> StepRegistry:
    """extract (cpu) -> embed (gpu) -> index (cpu): state carried and changed, refs of every lifetime,
    and the failures a test asks for in the input."""
    reg = StepRegistry()

    @reg.step(A, accepts=["blazen::StartEvent"])
    async def extract(event: dict, ctx: Any) -> dict:
        ctx.state["doc"] = {"text": event["text"], "seen": [A]}
        ctx.state["scratch"] = 1
        ctx.session_refs.insert(b"extract-scratch")  # UntilContextDrop: gone when the run ends
        if event.get("orphan"):
            return {"type": "Nobody", "x": 1}
        return {"type": "Extracted", "words": event["text"].split(), "mode": event.get("mode")}

    @reg.step(B, accepts=["Extracted"])
    async def embed(event: dict, ctx: Any) -> dict:
        ctx.state["doc"]["seen"].append(B)  # an in-place change travels too
        del ctx.state["scratch"]
        ctx.session_refs.insert(b"embed-scratch")
        kept = ctx.session_refs.insert(
            b"vectors:" + " ".join(event["words"]).encode(),
            type_tag="Vectors",
            lifetime=RefLifetime.UntilExplicitDrop,
        )
        if event["mode"] == "fail":
            raise ValueError("embedding model refused the batch")
        if event["mode"] == "slow":
            probe.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                probe.cancelled.set()
                raise
        return {"type": "Embedded", "n": len(event["words"]), "vectors": kept.uuid}

    @reg.step(C, accepts=["Embedded"])
    def index(event: dict, ctx: Any) -> list[dict]:  # a plain def: runs on the peer's step threads
        ctx.state["doc"]["seen"].append(C)
        ctx.state["indexed"] = event["n"]
        kept = ctx.session_refs.insert(
            b"index-of:" + str(event["n"]).encode(), type_tag="Index", lifetime=RefLifetime.UntilParentFinish
        )
        return [
            {"type": "Progress", "done": event["n"]},
            {"type": "blazen::StopEvent", "result": {"n": event["n"], "index": kept.uuid}},
        ]

    @reg.step("split.progress", accepts=["Progress"])
    async def progress(event: dict, ctx: Any) -> None:
        return None

    return reg


@dataclass
class Fleets:
    one: BlazenRouterServer  # over pool "all": one peer serving every step
    split: BlazenRouterServer  # over pools "cpu" (extract, index) and "gpu" (embed)
    all: BlazenPeerServer
    cpu: BlazenPeerServer
    gpu: BlazenPeerServer
    probe: Probe
    token_file: str

    @property
    def split_pools(self) -> dict[str, list[str]]:
        return {"cpu": [f"127.0.0.1:{self.cpu.grpc_port}"], "gpu": [f"127.0.0.1:{self.gpu.grpc_port}"]}

    async def client(self, router: BlazenRouterServer) -> BlazenPeerClient:
        return await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "split-caller")


async def start_fleets(tmp: Path) -> Fleets:
    token = tmp / "router-token"
    token.write_text("fleet-router-3c1f0a9e\n")
    probe = Probe(asyncio.Event(), asyncio.Event())
    reg = build_registry(probe)
    cfg = {"insecure": True, "fleet_router_token_file": str(token)}
    every = [A, B, C, "split.progress"]
    all_ = await start_peer(reg, node_id="all-0", steps=every, **cfg)
    cpu = await start_peer(reg, node_id="cpu-0", steps=[A, C, "split.progress"], **cfg)
    gpu = await start_peer(reg, node_id="gpu-0", steps=[B], **cfg)
    one = await start_router({"all": [f"127.0.0.1:{all_.grpc_port}"]}, node_id="r1", **cfg)
    split = await start_router(
        {"cpu": [f"127.0.0.1:{cpu.grpc_port}"], "gpu": [f"127.0.0.1:{gpu.grpc_port}"]}, node_id="r2", **cfg
    )
    return Fleets(one, split, all_, cpu, gpu, probe, str(token))


@pytest.fixture
async def fleets(tmp_path: Path) -> AsyncIterator[Fleets]:
    f = await start_fleets(tmp_path)
    try:
        yield f
    finally:
        for s in (f.one, f.split, f.all, f.cpu, f.gpu):
            await s.stop(grace=0)


async def both(f: Fleets, text: str, mode: str | None = None, **kw: Any) -> tuple[SubWorkflowResponse, ...]:
    out = []
    for router in (f.one, f.split):
        client = await f.client(router)
        try:
            out.append(await client.invoke_sub_workflow("ingest", STEPS, {"text": text, "mode": mode, **kw}))
        finally:
            await client.close()
    return tuple(out)


async def refs_of(resp: SubWorkflowResponse, router: BlazenRouterServer) -> list[tuple[str, bytes]]:
    """(type tag, payload) of each ref of a response, dereferenced through ``router``; sorted."""
    client = await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "deref")
    try:
        return sorted([(d.type_tag, await client.deref_session_ref(k)) for k, d in resp.remote_refs.items()])
    finally:
        await client.close()


async def test_a_split_run_answers_as_one_pool(fleets: Fleets) -> None:
    one, split = await both(fleets, "alpha beta gamma")
    assert split.error is None
    assert one.error is None
    assert split.state_json == one.state_json  # byte for byte
    assert split.state_values() == {"doc": {"text": "alpha beta gamma", "seen": [A, B, C]}, "indexed": 3}
    assert split.result_value()["n"] == one.result_value()["n"] == 3
    # refs: the same count, type tags and payloads; each from the pod that made it
    assert (
        await refs_of(split, fleets.split)
        == await refs_of(one, fleets.one)
        == [
            ("Index", b"index-of:3"),
            ("Vectors", b"vectors:alpha beta gamma"),
        ]
    )
    origins = {d.type_tag: d.origin_node_id for d in split.remote_refs.values()}
    assert origins == {"Index": "cpu-0", "Vectors": "gpu-0"}
    assert {d.origin_node_id for d in one.remote_refs.values()} == {"all-0"}
    # the result's ref (made on cpu) is listed and held where it says
    assert split.result_value()["index"] in split.remote_refs
    # the run's UntilContextDrop refs are gone on both pools; the kept ones stay where they were made
    assert (fleets.cpu.refs.count, fleets.gpu.refs.count) == (1, 1)
    assert fleets.all.refs.count == 2
    assert len(fleets.cpu.remote_runs) == len(fleets.gpu.remote_runs) == 0
    # release through the router reaches the owning pod
    client = await fleets.client(fleets.split)
    try:
        for key in split.remote_refs:
            assert await client.release_session_ref(key) is True
    finally:
        await client.close()
    assert (fleets.cpu.refs.count, fleets.gpu.refs.count) == (0, 0)


async def test_a_step_error_on_the_second_pool(fleets: Fleets) -> None:
    one, split = await both(fleets, "x y", "fail")
    assert (
        split.error
        == one.error
        == "workflow error: step 'split.embed' failed: embedding model refused the batch"
    )
    assert split.result_json is None
    assert split.state_json == {} == one.state_json
    # the kept ref made before the failure survives, as in one peer; the scratch refs are gone
    assert (
        await refs_of(split, fleets.split) == await refs_of(one, fleets.one) == [("Vectors", b"vectors:x y")]
    )
    assert (fleets.cpu.refs.count, fleets.gpu.refs.count) == (0, 1)


async def test_an_event_nobody_accepts(fleets: Fleets) -> None:
    one, split = await both(fleets, "x", orphan=True)
    assert split.error == one.error == "workflow error: no handler for event type: Nobody"
    assert split.remote_refs == {} == one.remote_refs
    assert fleets.cpu.refs.count == 0


async def test_timeout_cancels_the_remote_step_and_ends_the_run(fleets: Fleets) -> None:
    client = await fleets.client(fleets.split)
    try:
        t0 = time.monotonic()
        resp = await client.invoke_sub_workflow(
            "ingest", STEPS, {"text": "a b", "mode": "slow"}, timeout_secs=1
        )
        took = time.monotonic() - t0
    finally:
        await client.close()
    assert resp.error == "workflow timed out after 1s"
    assert took < 10, took
    assert fleets.probe.started.is_set()
    # the step on the gpu pool saw its cancellation
    await asyncio.wait_for(fleets.probe.cancelled.wait(), 10)
    # and the run ended on both pods: scratch refs dropped, the kept Vectors ref listed and held
    assert await refs_of(resp, fleets.split) == [("Vectors", b"vectors:a b")]
    assert (fleets.cpu.refs.count, fleets.gpu.refs.count) == (0, 1)
    # the one-pool answer is the same
    one = await (await fleets.client(fleets.one)).invoke_sub_workflow(
        "ingest", STEPS, {"text": "a b", "mode": "slow"}, timeout_secs=1
    )
    assert one.error == resp.error


async def test_streaming_yields_every_steps_events_in_order(fleets: Fleets) -> None:
    streams: list[list[SubWorkflowEvent | SubWorkflowResponse]] = []
    for router in (fleets.one, fleets.split):
        client = await fleets.client(router)
        try:
            streams.append(
                [f async for f in client.stream_sub_workflow_events("ingest", STEPS, {"text": "p q r s"})]
            )
        finally:
            await client.close()
    one, split = streams

    def shape(frames: list) -> list:
        # ref ids differ from run to run: the rest of each event's JSON is compared byte for byte
        def mask(raw: bytes) -> bytes:
            for ref in [*one[-1].remote_refs, *split[-1].remote_refs]:
                raw = raw.replace(ref.encode(), b"<ref>")
            return raw

        return [(e.sequence, e.step_id, e.event_type, mask(e.event_json)) for e in frames[:-1]]

    assert shape(split) == shape(one)
    assert [(s, t) for _, s, t, _ in shape(split)] == [
        (A, "Extracted"),
        (B, "Embedded"),
        (C, "Progress"),
        (C, "blazen::StopEvent"),
    ]
    final_one, final_split = one[-1], split[-1]
    assert isinstance(final_split, SubWorkflowResponse)
    assert isinstance(final_one, SubWorkflowResponse)
    assert final_split.state_json == final_one.state_json
    assert final_split.error is None
    assert final_split.result_value()["n"] == 4
    assert len(final_split.remote_refs) == 2


async def test_split_runs_are_counted(fleets: Fleets) -> None:
    await both(fleets, "m n")
    await both(fleets, "m n", "fail")
    _, body = await http_get(f"http://127.0.0.1:{fleets.split.admin_port}/metrics")
    assert metric(body, "blazen_router_split_runs_total", outcome="ok") == 1
    assert metric(body, "blazen_router_split_runs_total", outcome="error") == 1
    # extract and index, then extract: "split.progress" never runs, the stop event next to it ends the run
    assert metric(body, "blazen_router_split_steps_total", pool="cpu") == 3
    assert metric(body, "blazen_router_split_steps_total", pool="gpu") == 2
    _, body = await http_get(f"http://127.0.0.1:{fleets.one.admin_port}/metrics")
    assert metric(body, "blazen_router_split_runs_total", outcome="ok") is None  # one pool: not split


async def test_pools_that_do_not_trust_the_router_are_not_split_over(tmp_path: Path) -> None:
    """Peers without --fleet-router-*: the router answers NOT_FOUND as before, naming where each step is."""
    probe = Probe(asyncio.Event(), asyncio.Event())
    reg = build_registry(probe)
    cpu = await start_peer(reg, node_id="cpu-0", steps=[A, C], insecure=True)
    gpu = await start_peer(reg, node_id="gpu-0", steps=[B], insecure=True)
    router = await start_router(
        {"cpu": [f"127.0.0.1:{cpu.grpc_port}"], "gpu": [f"127.0.0.1:{gpu.grpc_port}"]}, insecure=True
    )
    client = await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "c")
    try:
        with pytest.raises(PeerUnknownStepError) as err:
            await client.invoke_sub_workflow("ingest", STEPS, {"text": "a"})
        assert "no pool serves all of step ids" in str(err.value)
    finally:
        await client.close()
        for s in (router, cpu, gpu):
            await s.stop(grace=0)


async def test_a_split_run_without_the_router_token_is_refused_by_the_pools(tmp_path: Path) -> None:
    """A router holding a wrong fleet router token: the pools refuse its steps; the caller sees the status,
    nothing ran."""
    f = await start_fleets(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-router")
    rogue = await start_router(f.split_pools, insecure=True, fleet_router_token_file=str(wrong))
    client = await BlazenPeerClient.connect(f"http://127.0.0.1:{rogue.grpc_port}", "c")
    try:
        with pytest.raises(PeerTransportError) as err:
            await client.invoke_sub_workflow("ingest", STEPS, {"text": "a"})
        assert err.value.code == "PERMISSION_DENIED"
        assert f.cpu.refs.count == 0
    finally:
        await client.close()
        for s in (rogue, f.one, f.split, f.all, f.cpu, f.gpu):
            await s.stop(grace=0)


@pytest.mark.interop
async def test_the_blazen_wheel_gets_a_split_run(fleets: Fleets, isoc23_shim: Path, tmp_path: Path) -> None:
    """The real ``blazen`` client sends one request to a ``blazen-peer route`` process over the two pools."""
    route = ("--node-id", "router-proc", "--fleet-router-token-file", fleets.token_file)
    async with route_process(tmp_path, fleets.split_pools, *route) as router:
        ops = [
            {"op": "invoke", "transport": t, "workflow": "ingest", "steps": STEPS, "input": {"text": "w1 w2"}}
            for t in ("grpc", "http")
        ]
        ops.append({"op": "deref", "transport": "grpc", "uuid": "$ref1"})
        via_grpc, via_http, deref = await run_driver(
            isoc23_shim, f"http://127.0.0.1:{router.grpc}", f"http://127.0.0.1:{router.http}", "wheel", ops
        )
    expected_state = {"doc": {"text": "w1 w2", "seen": [A, B, C]}, "indexed": 2}
    for resp in (via_grpc, via_http):
        assert resp["error"] is None, resp
        assert resp["state"] == expected_state
        assert resp["result"]["n"] == 2
        assert sorted(d["origin_node_id"] for d in resp["refs"].values()) == ["cpu-0", "gpu-0"]
    # refs are listed sorted: $ref1 is one of the two; its payload comes back through the router
    assert bytes.fromhex(deref["payload_hex"]) in (b"vectors:w1 w2", b"index-of:2")


async def test_a_caller_gone_mid_run_cancels_the_step_and_ends_the_run(fleets: Fleets) -> None:
    """The caller's deadline passes while the gpu step runs: the hop is cancelled with it, the step sees its
    cancellation, and the run still ends on both pods (its scratch refs go, its kept ref is released by
    nobody: it stays, as in one peer)."""
    client = await fleets.client(fleets.split)
    try:
        with pytest.raises(PeerTransportError) as err:
            await client.invoke_sub_workflow("ingest", STEPS, {"text": "d e", "mode": "slow"}, deadline=1.0)
        assert err.value.code == "DEADLINE_EXCEEDED"
    finally:
        await client.close()
    await asyncio.wait_for(fleets.probe.cancelled.wait(), 10)
    for _ in range(100):
        if (fleets.cpu.refs.count, fleets.gpu.refs.count) == (0, 1) and not len(fleets.gpu.remote_runs):
            break
        await asyncio.sleep(0.05)
    assert (fleets.cpu.refs.count, fleets.gpu.refs.count) == (0, 1)
    assert len(fleets.cpu.remote_runs) == len(fleets.gpu.remote_runs) == 0


async def test_bad_input_json_gets_the_peers_status(fleets: Fleets) -> None:
    req = wrap(SubWorkflowRequest("ingest", STEPS, b'{"text": ').encode())
    answers = []
    for router in (fleets.one, fleets.split):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.grpc_port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(PATH_INVOKE)(req, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as stream_err:
                async for _ in ch.unary_stream(PATH_STREAM)(req, timeout=10):
                    pass
        answers.append(
            (err.value.code(), err.value.details(), stream_err.value.code(), stream_err.value.details())
        )
    assert answers[0] == answers[1]
    assert answers[1][0] == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_fan_out_wave_over_two_pools(tmp_path: Path) -> None:
    """One event accepted by a step on each pool: both run at once (one wave) and the first stop event in step
    order wins, as in one peer. The documented difference: each remote step sees the state as it was when the
    wave started (one peer's steps share one dict), and their changes are merged."""
    reg = StepRegistry()

    @reg.step("fan.cpu", accepts=["blazen::StartEvent"])
    async def on_cpu(event: dict, ctx: Any) -> dict:
        ctx.state["cpu"] = sorted(ctx.state)
        await asyncio.sleep(0.05)
        return {"type": "Part", "from": "cpu"}

    @reg.step("fan.gpu", accepts=["blazen::StartEvent"])
    async def on_gpu(event: dict, ctx: Any) -> dict:
        ctx.state["gpu"] = sorted(ctx.state)
        return {"type": "Part", "from": "gpu"}

    @reg.step("fan.join", accepts=["Part"])
    async def join(event: dict, ctx: Any) -> dict:
        return {"type": "blazen::StopEvent", "result": event["from"]}

    token = tmp_path / "t"
    token.write_text("fan-token")
    cfg = {"insecure": True, "fleet_router_token_file": str(token)}
    everything = await start_peer(reg, node_id="all", steps=["fan.cpu", "fan.gpu", "fan.join"], **cfg)
    cpu = await start_peer(reg, node_id="cpu", steps=["fan.cpu", "fan.join"], **cfg)
    gpu = await start_peer(reg, node_id="gpu", steps=["fan.gpu"], **cfg)
    one = await start_router({"all": [f"127.0.0.1:{everything.grpc_port}"]}, **cfg)
    split = await start_router(
        {"cpu": [f"127.0.0.1:{cpu.grpc_port}"], "gpu": [f"127.0.0.1:{gpu.grpc_port}"]}, **cfg
    )
    try:
        answers = []
        for router in (one, split):
            client = await BlazenPeerClient.connect(f"http://127.0.0.1:{router.grpc_port}", "c")
            try:
                answers.append(await client.invoke_sub_workflow("fan", ["fan.cpu", "fan.gpu", "fan.join"]))
            finally:
                await client.close()
        a, b = answers
        assert b.error is None
        assert b.result_value() == a.result_value() == "cpu"
        assert b.state_values() == {"cpu": [], "gpu": []}
        assert a.state_values() == {"cpu": [], "gpu": ["cpu"]}  # one dict: gpu saw cpu's key
    finally:
        for s in (one, split, everything, cpu, gpu):
            await s.stop(grace=0)
