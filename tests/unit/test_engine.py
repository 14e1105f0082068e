"""The engine behind both transports, driven directly through ``PeerService``."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from blazen_peer.engine import PeerService, RefLifetime, SessionRefStore, StepRegistry, Workflow
from blazen_peer.engine.executor import StepExecutor
from blazen_peer.engine.refs import SessionRefLimitError
from blazen_peer.wire import SubWorkflowRequest
from blazen_peer.wire.errors import PeerStatusError, Status

STOP = "blazen::StopEvent"
START_EVENT = "blazen::StartEvent"


def req(
    steps: list[str], data: Any = None, timeout: int | None = None, name: str = "wf"
) -> SubWorkflowRequest:
    return SubWorkflowRequest.new(name, steps, {} if data is None else data, timeout)


def service(reg: StepRegistry, **kw: Any) -> PeerService:
    return PeerService("node", reg, executor=StepExecutor(4), **kw)


async def test_fan_out_duplicates_and_routing_by_type() -> None:
    reg = StepRegistry()
    seen: list[str] = []

    @reg.step("start")
    async def start(event: dict, ctx: Any) -> dict:
        return {"type": "Work"}

    @reg.step("w1", accepts=["Work"])
    async def w1(event: dict, ctx: Any) -> None:
        seen.append("w1")

    @reg.step("w2", accepts=["Work"])
    def w2(event: dict, ctx: Any) -> dict:
        seen.append("w2")
        return {"type": STOP, "result": len(seen)}

    resp = await service(reg).invoke(req(["w2", "w1", "start"]))
    assert resp.error is None
    assert sorted(seen) == ["w1", "w2"]
    seen.clear()
    # A repeated id runs once (Blazen would register the step twice: issue #10, repeats cannot multiply work).
    resp = await service(reg).invoke(req(["start", "w1", "w1", "w2", "w1"]))
    assert seen.count("w1") == 1


def test_step_index_cache_is_bounded_and_holds_only_valid_lists_without_repeats() -> None:
    from blazen_peer.engine.service import INDEX_CACHE_SIZE

    reg = StepRegistry()
    ids = [f"s{i}" for i in range(12)]
    for sid in ids:
        reg.register(sid, ["blazen::StartEvent"], lambda e, c: {"type": STOP})
    svc = service(reg)
    svc.precheck(SubWorkflowRequest("wf", ["s1", "s2"]))
    orderings = itertools.islice(itertools.permutations(ids, 4), 3 * INDEX_CACHE_SIZE)
    for n, ordering in enumerate(orderings):  # distinct valid lists
        svc.precheck(SubWorkflowRequest("wf", list(ordering)))
        svc.precheck(SubWorkflowRequest("wf", ["s1"] * (n + 2)))  # repeats: valid, never cached
        with pytest.raises(PeerStatusError):
            svc.precheck(SubWorkflowRequest("wf", ["s1", f"unknown-{n}"]))  # invalid: never cached
        svc.precheck(SubWorkflowRequest("wf", ["s1", "s2"]))  # recently used: kept
    cache = svc._index_cache
    assert len(cache) == INDEX_CACHE_SIZE
    assert ("s1", "s2") in cache
    assert all(len(set(key)) == len(key) and set(key) <= set(ids) for key in cache)


async def test_status_checks_in_blazens_order() -> None:
    reg = StepRegistry()
    reg.register("s", ["blazen::StartEvent"], lambda e, c: {"type": STOP})
    svc = service(reg)
    bad = SubWorkflowRequest("wf", ["nope"], b"{x", None, envelope_version=2)
    with pytest.raises(PeerStatusError) as err:
        await svc.invoke(bad)
    assert err.value.status is Status.FAILED_PRECONDITION
    with pytest.raises(PeerStatusError) as err:
        await svc.invoke(SubWorkflowRequest("wf", ["s", "nope", "x"], b"{x"))
    assert (err.value.status, err.value.message) == (Status.NOT_FOUND, "unknown step id `nope`")
    with pytest.raises(PeerStatusError) as err:
        await svc.invoke(SubWorkflowRequest("wf", ["s"], b"{x"))
    assert err.value.status is Status.INVALID_ARGUMENT
    assert err.value.message.startswith("invalid input JSON: ")


async def test_steps_allow_list_and_default_workflow() -> None:
    reg = StepRegistry()
    wf = Workflow("pipe", registry=reg)
    wf.add_step("a", ["blazen::StartEvent"], lambda e, c: {"type": "B", "x": e["x"]})
    wf.add_step("b", ["B"], lambda e, c: {"type": STOP, "result": e["x"] * 2})
    assert (await service(reg).invoke(req([], {"x": 4}, name="pipe"))).result_value() == 8
    limited = service(reg, served_steps=["a"])
    assert limited.served_step_ids() == ["a"]
    with pytest.raises(PeerStatusError, match="unknown step id `b`"):
        await limited.invoke(req(["a", "b"]))
    with pytest.raises(PeerStatusError, match="unknown step id `b`"):
        await limited.invoke(req([], name="pipe"))


async def test_errors_are_ok_responses() -> None:
    reg = StepRegistry()
    reg.register("bad-return", ["blazen::StartEvent"], lambda e, c: 42)
    reg.register("no-type", ["blazen::StartEvent"], lambda e, c: {"x": 1})
    reg.register("dead-end", ["blazen::StartEvent"], lambda e, c: None)
    reg.register("unserializable", ["blazen::StartEvent"], lambda e, c: {"type": STOP, "result": object()})
    svc = service(reg)
    assert "returned int" in (await svc.invoke(req(["bad-return"]))).error
    assert 'without a string "type" key' in (await svc.invoke(req(["no-type"]))).error
    assert "ended without a blazen::StopEvent" in (await svc.invoke(req(["dead-end"]))).error
    assert "not JSON-serializable" in (await svc.invoke(req(["unserializable"]))).error


async def test_cpu_heavy_sync_step_does_not_stall_other_calls() -> None:
    reg = StepRegistry()

    @reg.step("cpu")
    def cpu(event: dict, ctx: Any) -> dict:
        end = time.perf_counter() + 1.0
        n = 0
        while time.perf_counter() < end:
            n += 1
        return {"type": STOP, "result": n}

    @reg.step("echo")
    async def echo(event: dict, ctx: Any) -> dict:
        return {"type": STOP, "result": "fast"}

    svc = service(reg)
    slow = asyncio.ensure_future(svc.invoke(req(["cpu"])))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    fast = await svc.invoke(req(["echo"]))
    assert fast.result_value() == "fast"
    assert time.perf_counter() - t0 < 0.5
    assert not slow.done()
    assert (await slow).error is None


async def test_state_is_exported() -> None:
    reg = StepRegistry()

    @reg.step("s")
    async def s(event: dict, ctx: Any) -> dict:
        ctx.state["seen"] = {"input": event["v"]}
        return {"type": STOP, "result": None}

    resp = await service(reg).invoke(req(["s"], {"v": [1, 2]}))
    assert resp.state_values() == {"seen": {"input": [1, 2]}}
    assert resp.result_json == b"null"


async def test_ref_lifetimes_and_caps() -> None:
    reg = StepRegistry()

    @reg.step("mk")
    async def mk(event: dict, ctx: Any) -> dict:
        for life in RefLifetime:
            ctx.session_refs.insert(life.name.encode(), type_tag=life.name, lifetime=life)
        ctx.session_refs.insert(object(), lifetime=RefLifetime.UntilExplicitDrop)  # live-only: never listed
        return {"type": STOP, "result": None}

    store = SessionRefStore(max_count=4, max_bytes=1000)
    svc = service(reg, refs=store)
    resp = await svc.invoke(req(["mk"]))
    tags = sorted(d.type_tag for d in resp.remote_refs.values())
    assert tags == ["UntilExplicitDrop", "UntilParentFinish"]
    assert store.count == 3  # the context-drop ref is gone; the live-only one stays until released
    for key, d in resp.remote_refs.items():
        assert await svc.deref(key) == d.type_tag.encode()
    # The cap hit inside a step that does not catch it answers the whole call RESOURCE_EXHAUSTED (HTTP
    # 429) naming the flag, as a cap hit while encoding the result does; it is not a step failure.
    with pytest.raises(PeerStatusError) as err:
        await svc.invoke(req(["mk"]))
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    assert err.value.message == "session ref limit reached: 4 refs held, the cap is 4 (--ref-max-count)"
    assert store.count == 3  # the failed run's own context-drop ref (its only insert that fit) is gone

    small = SessionRefStore(max_bytes=10)
    with pytest.raises(SessionRefLimitError, match="byte limit"):
        small.insert(b"x" * 11)


async def test_ref_cap_hit_inside_a_step() -> None:
    """Escaping the step: RESOURCE_EXHAUSTED naming the flag, on either cap, from async and sync steps and
    from a step running alongside others; the run's context-drop refs are dropped. Caught by the step: the
    run carries on and succeeds."""
    reg = StepRegistry()

    def fill(event: dict, ctx: Any) -> dict:
        ctx.session_refs.insert(b"scratch")  # UntilContextDrop
        refused = None
        try:
            ctx.session_refs.insert(b"k" * event["size"], lifetime=RefLifetime.UntilExplicitDrop)
        except SessionRefLimitError as exc:
            if not event.get("catch"):
                raise
            refused = str(exc)
        return {"type": STOP, "result": {"refused": refused}}

    async def fill_async(event: dict, ctx: Any) -> dict:
        return fill(event, ctx)

    async def idle(event: dict, ctx: Any) -> None:
        await asyncio.sleep(10)

    reg.register("fill", [START_EVENT], fill)
    reg.register("fill-async", [START_EVENT], fill_async)
    reg.register("idle", [START_EVENT], idle)
    store = SessionRefStore(max_count=3, max_bytes=100)
    svc = service(reg, refs=store)
    assert (await svc.invoke(req(["fill"], {"size": 10}))).error is None
    assert (store.count, store.bytes_used) == (1, 10)
    for steps in (["fill"], ["fill-async"], ["idle", "fill"]):
        with pytest.raises(PeerStatusError) as err:
            await svc.invoke(req(steps, {"size": 200}))
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert err.value.message == (
            "session ref byte limit reached: 17 bytes held + 200 new > cap 100 (--ref-max-bytes)"
        )
        assert (store.count, store.bytes_used) == (1, 10)  # the scratch ref went with the run
    resp = await svc.invoke(req(["fill"], {"size": 200, "catch": True}))
    assert resp.error is None
    assert "(--ref-max-bytes)" in resp.result_value()["refused"]
    assert (store.count, store.bytes_used) == (1, 10)

    assert (await svc.invoke(req(["fill-async"], {"size": 10}))).error is None
    assert store.count == 2
    with pytest.raises(PeerStatusError) as err:
        await svc.invoke(req(["fill"], {"size": 10}))
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    assert err.value.message == "session ref limit reached: 3 refs held, the cap is 3 (--ref-max-count)"
    assert store.count == 2
    resp = await svc.invoke(req(["fill-async"], {"size": 10, "catch": True}))
    assert resp.error is None
    assert "(--ref-max-count)" in resp.result_value()["refused"]
    assert store.count == 2


def test_parent_finish_ttl() -> None:
    now = [100.0]
    store = SessionRefStore(parent_ttl_secs=30, clock=lambda: now[0])
    store.open_run(1, lambda: False)
    h = store.insert(b"v", lifetime="UntilParentFinish", run_id=1)
    e = store.insert(b"w", lifetime=RefLifetime.UntilExplicitDrop, run_id=1)
    assert store.payload(h.uuid) == b"v"
    now[0] += 31
    assert store.payload(h.uuid) is None
    assert store.payload(e.uuid) == b"w"
    assert store.sweep() == 0
    assert store.release(e.uuid) is True
    assert store.release(e.uuid) is False


async def test_timeout_cancels() -> None:
    reg = StepRegistry()
    done: list[int] = []

    @reg.step("slow")
    async def slow(event: dict, ctx: Any) -> dict:
        await asyncio.sleep(0.5)
        done.append(1)
        return {"type": STOP}

    t0 = time.perf_counter()
    resp = await service(reg).invoke(SubWorkflowRequest.new("wf", ["slow"], {}, 0))
    assert resp.error == "workflow timed out after 0s"
    assert time.perf_counter() - t0 < 0.3
    await asyncio.sleep(0.6)
    assert done == []


async def test_result_encoding_handles_refs_and_rejects_other_objects() -> None:
    class Model:
        def __blazen_serialize__(self) -> bytes:
            return b"weights"

    reg = StepRegistry()

    @reg.step("plain")
    async def plain(event: dict, ctx: Any) -> dict:
        return {"type": STOP, "result": {"text": "é", "n": [1, 2]}}

    @reg.step("refs")
    async def refs(event: dict, ctx: Any) -> dict:
        handle = ctx.session_refs.insert(b"kept", lifetime=RefLifetime.UntilExplicitDrop)
        return {"type": STOP, "result": {"handle": handle, "model": Model()}}

    @reg.step("opaque")
    async def opaque(event: dict, ctx: Any) -> dict:
        return {"type": STOP, "result": {"x": object()}}

    svc = service(reg)
    resp = await svc.invoke(req(["plain"]))
    assert resp.result_json == '{"n":[1,2],"text":"é"}'.encode()
    resp = await svc.invoke(req(["refs"]))
    assert resp.error is None
    result = resp.result_value()
    assert len(resp.remote_refs) == 2  # the inserted handle and the auto-ref of the serializable model
    assert {result["handle"]["__blazen_session_ref__"], result["model"]["__blazen_session_ref__"]} == set(
        resp.remote_refs
    )
    model_ref = result["model"]["__blazen_session_ref__"]
    assert (await svc.deref(model_ref)).endswith(b"weights")  # behind the ref envelope header
    resp = await svc.invoke(req(["opaque"]))
    assert resp.result_json is None
    assert (
        resp.error
        == "workflow error: result is not JSON-serializable: Object of type object is not JSON serializable"
    )
