"""Issue #10 item 3 (engine) against real peers: repeated step ids run each step once, ``timeout_secs``
bounds the whole run (fan-out and steps that swallow cancellation included), and a stream whose client
stops reading stops the run at a bounded queue instead of buffering without end."""

from __future__ import annotations

import asyncio
import time

import pytest
from blazen_peer.wire.messages import SubWorkflowResponse

from .conftest import ROUTE_INVOKE, STREAM, PeerFactory, invoke_json, request

MIB = 1024 * 1024


@pytest.mark.timeout(120)
async def test_repeated_step_ids_run_each_step_once(peer_factory: PeerFactory) -> None:
    peer = await peer_factory()
    resp = await peer.invoke(["tally", "tally_done", "tally"] * 1000)
    assert (resp.error, resp.result_value()) == (None, "ok"), resp
    assert (await peer.probe())["counts"] == {"tally": 1, "tally_done": 1}
    status, body = await peer.post(ROUTE_INVOKE, invoke_json(["tally", "tally_done"] * 1000))
    assert (status, body["error"]) == (200, None), body
    assert (await peer.probe())["counts"] == {"tally": 2, "tally_done": 2}

    # Two ids repeated up to the 4 MiB message limit (~490,000 ids; 17 bytes of postcard per pair).
    ids = ["tally", "tally_done"] * ((4 * MIB - 64) // 17)
    rss0 = peer.rss_bytes()
    t0 = time.monotonic()
    for _ in range(3):
        resp = await peer.invoke(ids)
        assert (resp.error, resp.result_value()) == (None, "ok"), resp
    seconds = time.monotonic() - t0
    growth = peer.rss_bytes() - rss0
    assert (await peer.probe())["counts"] == {"tally": 5, "tally_done": 5}
    print(f"3 x {len(ids)} repeated ids: {seconds:.2f} s, RSS growth {growth / MIB:.1f} MiB")
    assert seconds < 30
    assert growth < 100 * MIB
    await peer.assert_serving()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "steps",
    [["stubborn"], ["fan", "fan_stubborn", "fan_sleep"], ["fan", "fan_sleep"], ["tick", "tock"]],
    ids=["stubborn", "fan-out-stubborn", "fan-out", "endless-cycle"],
)
async def test_timeout_bounds_the_whole_run(peer_factory: PeerFactory, steps: list[str]) -> None:
    peer = await peer_factory()
    for transport in ("invoke", "stream", "http"):
        t0 = time.monotonic()
        if transport == "invoke":
            resp = await peer.invoke(steps, {"secs": 20}, timeout_secs=1)
            error = resp.error
        elif transport == "stream":
            code, _, frames = await peer.stream(request(steps, {"secs": 20}, 1))
            assert (code, type(frames[-1])) == ("OK", SubWorkflowResponse), (code, frames)
            error = frames[-1].error
        else:
            status, body = await peer.post(ROUTE_INVOKE, invoke_json(steps, {"secs": 20}, 1))
            assert status == 200, body
            error = body["error"]
        seconds = time.monotonic() - t0
        assert error == "workflow timed out after 1s", (transport, error)
        assert seconds < 4, (transport, seconds)
    await peer.assert_serving()


@pytest.mark.timeout(120)
async def test_a_stream_nobody_reads_stops_at_a_bounded_queue(peer_factory: PeerFactory) -> None:
    """``tick``/``tock`` emit events for ever; the client reads one frame and then nothing."""
    peer = await peer_factory()
    assert peer.channel is not None
    call = peer.channel.unary_stream(STREAM)(request(["tick", "tock"]), timeout=60)
    await call.read()
    rss0 = peer.rss_bytes()
    await asyncio.sleep(2)
    first = (await peer.probe())["counts"]["tick"]
    await asyncio.sleep(3)
    second = (await peer.probe())["counts"]["tick"]
    growth = peer.rss_bytes() - rss0
    print(f"events emitted while the client does not read: {first} after 2 s, {second} after 5 s")
    assert second == first, "the run went on emitting events nobody reads"
    # 64 wait in the stream's queue; the rest (~1 KiB each) sit in gRPC's HTTP/2 flow-control windows.
    assert first < 20_000
    assert growth < 20 * MIB
    call.cancel()
    await peer.assert_serving()
