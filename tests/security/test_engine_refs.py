"""Issue #10 item 5 against real peers: a run's ``UntilContextDrop`` refs are dropped however the run ends
(success, step error, timeout, client cancellation, disconnect, on both transports), read back from the
``blazen_peer_session_refs`` gauge on the admin port, and a step that outlives its run cannot insert."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from .conftest import INVOKE, ROUTE_INVOKE, STREAM, PeerFactory, invoke_json, request


@pytest.mark.timeout(120)
async def test_context_drop_refs_go_however_the_run_ends(peer_factory: PeerFactory) -> None:
    peer = await peer_factory()
    assert peer.channel is not None

    resp = await peer.invoke(["refs_ok"], {"refs": 3})
    assert (resp.error, resp.remote_refs) == (None, {}), resp
    assert await peer.wait_refs(0) == 0, "success"

    resp = await peer.invoke(["refs_fail"], {"refs": 3})
    assert resp.error.startswith("workflow error: step 'refs_fail' failed"), resp
    assert await peer.wait_refs(0) == 0, "step error"

    resp = await peer.invoke(["sleep"], {"refs": 3, "secs": 30}, timeout_secs=1)
    assert resp.error == "workflow timed out after 1s", resp
    assert await peer.wait_refs(0) == 0, "timeout"

    async def held_then(action: str) -> None:
        """Start a run that inserts 3 refs and sleeps, check the gauge shows them, then end it."""
        if action in ("cancel", "deadline"):
            call = peer.channel.unary_unary(INVOKE)(
                request(["sleep"], {"refs": 3, "secs": 30}), timeout=2 if action == "deadline" else 30
            )
        else:
            call = peer.channel.unary_stream(STREAM)(request(["sleep"], {"refs": 3, "secs": 30}), timeout=30)
        assert await peer.wait_refs(3) == 3, action
        if action == "deadline":
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            call.cancel()
        assert await peer.wait_refs(0) == 0, action

    await held_then("cancel")
    await held_then("deadline")
    await held_then("stream-cancel")

    # Disconnect: a gRPC connection closed under a stream, an HTTP client gone mid-call.
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{peer.grpc}")
    call = channel.unary_stream(STREAM)(request(["sleep"], {"refs": 3, "secs": 30}), timeout=30)
    assert await peer.wait_refs(3) == 3
    await channel.close()
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
        await call.read()
    assert await peer.wait_refs(0) == 0, "gRPC disconnect"

    with pytest.raises(asyncio.TimeoutError):
        await peer.post(ROUTE_INVOKE, invoke_json(["sleep"], {"refs": 3, "secs": 3}), deadline=1)
    assert await peer.wait_refs(0) == 0, "HTTP disconnect"

    status, body = await peer.post(ROUTE_INVOKE, invoke_json(["refs_fail"], {"refs": 3}))
    assert status == 200, body
    assert body["error"].startswith("workflow error: step 'refs_fail' failed"), body
    assert await peer.wait_refs(0) == 0, "HTTP step error"
    await peer.assert_serving()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lifetime", ["UntilContextDrop", "UntilExplicitDrop"])
async def test_a_step_that_outlives_its_run_cannot_insert(peer_factory: PeerFactory, lifetime: str) -> None:
    peer = await peer_factory()
    resp = await peer.invoke(["late_insert"], {"secs": 2, "lifetime": lifetime}, timeout_secs=1)
    assert resp.error == "workflow timed out after 1s", resp
    for _ in range(50):
        late = (await peer.probe())["late"]
        if late:
            break
        await asyncio.sleep(0.1)
    assert len(late) == 1, late
    assert late[0].startswith("refused: session ref insert refused: run "), late
    assert late[0].endswith("has ended (its step outlived it)"), late
    assert await peer.refs_held() == 0
    await peer.assert_serving()
