"""Issue #10 item 4 against real peers: an async step that never awaits gets the process restarted (the
loop watchdog exits it, naming the step) instead of freezing it for ever; plain-``def`` steps that outlive
their run keep their concurrency slot and a saturated step executor refuses new sync work with
RESOURCE_EXHAUSTED / 429 until its threads come back."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from blazen_peer.wire.messages import SubWorkflowResponse

from tests.support.peers import http_get

from .conftest import ROUTE_INVOKE, PeerFactory, invoke_json, request


@pytest.mark.timeout(120)
async def test_an_async_step_that_never_awaits_gets_the_process_restarted(peer_factory: PeerFactory) -> None:
    peer = await peer_factory("--loop-stall-secs", "2")
    assert peer.proc is not None
    stuck = asyncio.ensure_future(peer.invoke(["spin"]))
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    # /healthz no longer answers 200 while the loop is held ...
    with pytest.raises((asyncio.TimeoutError, OSError)):
        await asyncio.wait_for(http_get(f"http://127.0.0.1:{peer.admin}/healthz"), 1)
    # ... and SIGTERM alone cannot get through; the watchdog ends the process.
    peer.proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(peer.proc.wait(), 15)
    seconds = time.monotonic() - t0
    print(f"exit {code} {seconds + 0.5:.1f} s after the step took the loop (--loop-stall-secs 2)")
    stuck.cancel()
    log = peer.log()
    assert code == 70, log[-3000:]
    assert seconds < 10, seconds
    for words in ("event loop blocked", "hostile_steps.py", "in spin"):
        assert words in log, log[-3000:]


@pytest.mark.timeout(120)
async def test_a_step_that_awaits_now_and_then_is_left_alone(peer_factory: PeerFactory) -> None:
    peer = await peer_factory("--loop-stall-secs", "2")
    resp = await peer.invoke(["sleep"], {"secs": 4})
    assert resp.error is None, resp
    await peer.assert_serving()
    assert "event loop blocked" not in peer.log()


@pytest.mark.timeout(120)
async def test_timed_out_sync_steps_hold_their_slot_and_saturation_is_refused(
    peer_factory: PeerFactory,
) -> None:
    peer = await peer_factory("--sync-step-workers", "2", "--max-concurrent-workflows", "4")
    sleepers = [peer.invoke(["sync_sleep"], {"secs": 5}, timeout_secs=1) for _ in range(2)]
    t0 = time.monotonic()
    for resp in await asyncio.gather(*sleepers):
        assert resp.error == "workflow timed out after 1s", resp
    assert time.monotonic() - t0 < 3
    # Both threads are still sleeping: sync work is refused at once, on both transports ...
    code, details = await peer.invoke(["sync_echo"], {"x": 1})
    assert code == "RESOURCE_EXHAUSTED", (code, details)
    assert "--sync-step-workers" in details, details
    status, body = await peer.post(ROUTE_INVOKE, invoke_json(["sync_echo"], {"x": 1}))
    assert status == 429, (status, body)
    assert "--sync-step-workers" in body["error"], body
    # ... async work still runs, but the limiter counts the two threads: 2 of 4 slots are left.
    first = asyncio.ensure_future(peer.invoke(["sleep"], {"secs": 2}))
    second = asyncio.ensure_future(peer.invoke(["sleep"], {"secs": 2}))
    await asyncio.sleep(0.5)
    code, details = await peer.invoke(["echo"], {"x": 2})
    assert (code, details[:33]) == ("RESOURCE_EXHAUSTED", "too many concurrent sub-workflows"), details
    assert [(await first).error, (await second).error] == [None, None]
    # The threads come back: sync work runs again and every slot is free.
    deadline = time.monotonic() + 10
    while (await peer.probe())["counts"].get("sync_sleep_finished", 0) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    resp = await peer.invoke(["sync_echo"], {"x": 3})
    assert isinstance(resp, SubWorkflowResponse), resp
    assert resp.result_value() == {"x": 3}, resp
    calls = [peer.invoke(["sleep"], {"secs": 1}) for _ in range(4)]
    assert all(r.error is None for r in await asyncio.gather(*calls))
    await peer.assert_serving()


@pytest.mark.timeout(120)
async def test_an_async_step_that_ignores_its_timeout_keeps_its_slot_until_it_stops(
    peer_factory: PeerFactory,
) -> None:
    peer = await peer_factory("--max-concurrent-workflows", "2")
    t0 = time.monotonic()
    resp = await peer.invoke(["stubborn"], {"secs": 4}, timeout_secs=1)
    assert resp.error == "workflow timed out after 1s", resp
    assert time.monotonic() - t0 < 3
    # The answer went out, the step goes on: of 2 slots, 1 is left.
    first = asyncio.ensure_future(peer.invoke(["sleep"], {"secs": 1}))
    await asyncio.sleep(0.3)
    code, details = await peer.invoke(["echo"], {"x": 1})
    assert (code, details[:33]) == ("RESOURCE_EXHAUSTED", "too many concurrent sub-workflows"), details
    assert (await first).error is None
    await asyncio.sleep(max(0.0, t0 + 4.5 - time.monotonic()))
    calls = [peer.invoke(["sleep"], {"secs": 0.5}) for _ in range(2)]
    assert [r.error for r in await asyncio.gather(*calls)] == [None, None]
    await peer.assert_serving()


@pytest.mark.timeout(120)
async def test_a_stream_abandoned_at_its_timeout_gives_its_slot_back_when_its_step_stops(
    peer_factory: PeerFactory,
) -> None:
    """The step outlives the stream's answer, then emits 200 events nobody will read."""
    peer = await peer_factory("--max-concurrent-workflows", "1")
    code, _, frames = await peer.stream(request(["stubborn_chatty", "noise"], {"secs": 2}, 1))
    assert (code, frames[-1].error) == ("OK", "workflow timed out after 1s"), (code, frames)
    # The step stops ~1 s after the answer; its events then end the abandoned run, which gives its slot back.
    deadline = time.monotonic() + 3
    while isinstance(resp := await peer.invoke(["echo"], {"x": 1}), tuple):
        assert resp[0] == "RESOURCE_EXHAUSTED", resp
        assert time.monotonic() < deadline, "the abandoned run did not give its slot back"
        await asyncio.sleep(0.2)
    await peer.assert_serving()
    await asyncio.sleep(1)
    assert "Task was destroyed but it is pending" not in peer.log()
