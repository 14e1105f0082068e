"""The peer's side of split runs (``engine.remote.RemoteRuns``) on its own: the state delta, a step that
arrives after its run ended, runs whose router never ended them, and the state kept between a run's steps
(deltas, budget)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from blazen_peer import RefLifetime, StepRegistry
from blazen_peer.engine import PeerService
from blazen_peer.engine.remote import RemoteRuns
from blazen_peer.wire.errors import PeerStatusError, Status
from blazen_peer.wire.fleet import RunStepRequest, RunStepResponse


def service() -> PeerService:
    reg = StepRegistry()

    @reg.step("s")
    async def s(event: dict, ctx: Any) -> dict:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.state.pop("gone", None)
        ctx.session_refs.insert(b"scratch")
        ctx.session_refs.insert(b"kept", type_tag="K", lifetime=RefLifetime.UntilExplicitDrop)
        return {"type": "Next", "n": ctx.state["n"]}

    return PeerService("node-a", reg)


def req(run_id: str, state: dict[str, bytes] | None = None) -> RunStepRequest:
    return RunStepRequest(run_id, "wf", "s", b'{"type":"blazen::StartEvent"}', state)


async def test_a_step_answers_its_events_and_only_what_it_changed_in_the_state() -> None:
    runs = RemoteRuns(service())
    run_id = str(uuid.uuid4())
    resp = await runs.run_step(req(run_id, {"n": b"4", "kept": b'{"a":[1,2]}', "gone": b"true"}))
    assert resp.error is None
    assert resp.events_json == [b'{"n":5,"type":"Next"}']
    assert resp.state_set == {"n": b"5"}  # "kept" unchanged: not sent back
    assert resp.state_deleted == ["gone"]
    store = runs.service.refs
    assert store.count == 2
    refs = runs.end_run(run_id)
    assert [(d.origin_node_id, d.type_tag) for d in refs.values()] == [("node-a", "K")]
    assert store.count == 1  # the UntilContextDrop one went with the run


async def test_a_step_of_an_ended_run_is_refused() -> None:
    runs = RemoteRuns(service())
    run_id = str(uuid.uuid4())
    assert runs.end_run(run_id) == {}  # EndRun overtook the step (cancelled on its way)
    with pytest.raises(PeerStatusError) as err:
        await runs.run_step(req(run_id))
    assert err.value.status is Status.FAILED_PRECONDITION
    assert runs.service.refs.count == 0


async def test_runs_their_router_never_ended_are_ended_when_idle() -> None:
    now = [100.0]
    runs = RemoteRuns(service(), idle_secs=60, clock=lambda: now[0])
    await runs.run_step(req(str(uuid.uuid4())))
    assert runs.sweep() == 0
    now[0] += 61
    assert runs.sweep() == 1
    assert len(runs) == 0
    assert runs.service.refs.count == 1  # the kept ref stays (UntilExplicitDrop), the scratch one went


async def test_bad_event_json_is_invalid_argument() -> None:
    runs = RemoteRuns(service())
    bad = RunStepRequest(str(uuid.uuid4()), "wf", "s", b"[1]")
    with pytest.raises(PeerStatusError) as err:
        await runs.run_step(bad)
    assert err.value.status is Status.INVALID_ARGUMENT
    unknown = RunStepRequest(str(uuid.uuid4()), "wf", "nope", b'{"type":"x"}')
    with pytest.raises(PeerStatusError) as err:
        await runs.run_step(unknown)
    assert err.value.status is Status.NOT_FOUND
    assert err.value.message == "unknown step id `nope`"


async def test_a_run_that_keeps_nothing_here_is_forgotten_at_once() -> None:
    reg = StepRegistry()

    @reg.step("plain")
    async def plain(event: dict, ctx: Any) -> dict:
        ctx.state["x"] = 1
        return {"type": "blazen::StopEvent", "result": None}

    runs = RemoteRuns(PeerService("node-b", reg))
    resp = await runs.run_step(
        RunStepRequest(str(uuid.uuid4()), "wf", "plain", b'{"type":"blazen::StartEvent"}')
    )
    assert resp.keeps_run is False  # the router needs no EndRun here
    assert len(runs) == 0
    # a step that used session refs keeps its run until EndRun
    kept = await RemoteRuns(service()).run_step(req(str(uuid.uuid4())))
    assert kept.keeps_run is True


def big_service() -> PeerService:
    reg = StepRegistry()

    @reg.step("grow")
    async def grow(event: dict, ctx: Any) -> dict:
        ctx.state["big"] = ctx.state.get("big", "") + "x" * event.get("add", 0)
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.state.pop("gone", None)
        return {"type": "Next", "n": ctx.state["n"], "size": len(ctx.state["big"])}

    return PeerService("node-c", reg)


def grow(run_id: str, state: dict[str, bytes], seq: int | None, **kw: Any) -> RunStepRequest:
    return RunStepRequest(run_id, "wf", "grow", b'{"type":"x","add":100000}', state, seq=seq, **kw)


async def test_a_large_state_is_kept_and_a_delta_applies_to_it() -> None:
    runs = RemoteRuns(big_service())
    run_id = str(uuid.uuid4())
    first = await runs.run_step(grow(run_id, {"gone": b"1"}, seq=1))
    assert first.state_kept
    assert not first.keeps_run  # only state: EndRun need not be awaited
    assert runs.state_bytes > 100_000
    # the router's delta from the kept state: n changed elsewhere, "other" added
    second = await runs.run_step(grow(run_id, {"n": b"7", "other": b"true"}, seq=3, base=1))
    assert second.events_json == [b'{"n":8,"size":200000,"type":"Next"}']
    assert second.state_kept
    # a delta from a state it no longer holds (it keeps the one after step 3 now): refused, nothing ran
    with pytest.raises(PeerStatusError) as err:
        await runs.run_step(grow(run_id, {}, seq=4, base=1))
    assert err.value.status is Status.FAILED_PRECONDITION
    assert err.value.message.startswith("run state not held")
    again = await runs.run_step(grow(run_id, {}, seq=5, base=3))
    assert again.events_json == [b'{"n":9,"size":300000,"type":"Next"}']
    runs.end_run(run_id)
    assert (len(runs), runs.state_bytes) == (0, 0)


async def test_kept_states_stay_within_the_budget_and_an_older_router_gets_none_kept() -> None:
    runs = RemoteRuns(big_service(), state_budget=150_000)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    assert (await runs.run_step(grow(a, {}, seq=1))).state_kept
    assert not (await runs.run_step(grow(b, {}, seq=1))).state_kept  # would exceed: not kept
    assert runs.state_bytes < 150_000
    with pytest.raises(PeerStatusError):
        await runs.run_step(grow(b, {}, seq=2, base=1))
    older = await runs.run_step(grow(str(uuid.uuid4()), {}, seq=None))  # no seq: an older router
    assert not older.state_kept
    assert not (await RemoteRuns(service()).run_step(req(str(uuid.uuid4()), {}))).state_kept  # small


async def test_kept_states_go_with_idle_runs() -> None:
    now = [0.0]
    runs = RemoteRuns(big_service(), idle_secs=60, clock=lambda: now[0])
    assert (await runs.run_step(grow(str(uuid.uuid4()), {}, seq=1))).state_kept
    now[0] += 61
    assert runs.sweep() == 1
    assert runs.state_bytes == 0


def test_run_step_messages_read_the_older_layout_and_keep_the_new_fields() -> None:
    old = RunStepRequest(str(uuid.uuid4()), "wf", "s", b"{}", {"k": b"1"})
    assert RunStepRequest.decode(old.encode()).seq is None  # what an older router sends
    new = RunStepRequest.decode(
        RunStepRequest(
            str(uuid.uuid4()), "wf", "s", b"{}", {"k": b"1"}, seq=9, base=4, state_deleted=["d"]
        ).encode()
    )
    assert (new.seq, new.base, new.state_deleted, new.state_json) == (9, 4, ["d"], {"k": b"1"})
    plain = RunStepResponse(keeps_run=False)
    assert plain.encode() == RunStepResponse(keeps_run=False, state_kept=False).encode()  # older layout
    assert RunStepResponse.decode(RunStepResponse(keeps_run=False, state_kept=True).encode()).state_kept
    assert not RunStepResponse.decode(plain.encode()).state_kept
