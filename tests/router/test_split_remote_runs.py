"""The peer's side of split runs (``engine.remote.RemoteRuns``) on its own: the state delta, a step that
arrives after its run ended, and runs whose router never ended them."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from blazen_peer import RefLifetime, StepRegistry
from blazen_peer.engine import PeerService
from blazen_peer.engine.remote import RemoteRuns
from blazen_peer.wire.errors import PeerStatusError, Status
from blazen_peer.wire.fleet import RunStepRequest


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
