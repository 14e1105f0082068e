from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from blazen_peer.admin.readiness import Readiness
from blazen_peer.security.drain import DRAINING_MESSAGE, Drainer
from blazen_peer.security.errors import DrainingError


class FakeCall:
    """An in-flight call that ends when told to."""

    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer
        self.release = asyncio.Event()

    async def run(self) -> str:
        with self.drainer.track():
            await self.release.wait()
        return "done"


async def test_drain_waits_for_in_flight_calls():
    ready = Readiness()
    ready.set_ready()
    d = Drainer(ready, grace_period=5)
    call = FakeCall(d)
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0)
    assert d.in_flight == 1
    drain = asyncio.create_task(d.drain())
    await asyncio.sleep(0.05)
    assert not ready.ready
    assert ready.draining
    assert not d.finished.is_set()
    with pytest.raises(DrainingError) as ei:
        d.enter()
    assert ei.value.grpc_code == grpc.StatusCode.UNAVAILABLE
    assert ei.value.http_status == 503
    assert ei.value.message == DRAINING_MESSAGE
    assert d.refused == 1
    call.release.set()
    assert await task == "done"
    assert await asyncio.wait_for(drain, 2) is True
    assert d.finished.is_set()
    assert d.clean is True


async def test_grace_period_bounds_the_wait():
    d = Drainer(grace_period=0.2)
    d.enter()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await d.drain() is False
    assert 0.15 <= loop.time() - t0 < 2
    assert d.clean is False
    assert d.finished.is_set()


async def test_admit_window_keeps_accepting_briefly():
    d = Drainer(grace_period=1, admit_window=0.2)
    d.begin()
    d.enter()  # still admitted: endpoints take a moment to drop the pod
    d.exit()
    await asyncio.sleep(0.25)
    with pytest.raises(DrainingError):
        d.enter()


def test_wait_idle_in_threads():
    d = Drainer()
    d.enter()
    assert d.wait_idle(0.05) is False
    d.exit()
    assert d.wait_idle(0.05) is True


async def test_sigterm_starts_the_drain_and_signals_exit():
    ready = Readiness()
    ready.set_ready()
    d = Drainer(ready, grace_period=5)
    finished = asyncio.Event()
    results = []

    async def on_finished(clean: bool) -> None:
        results.append(clean)
        finished.set()

    d.install_signal_handlers(on_finished=on_finished)
    try:
        call = FakeCall(d)
        task = asyncio.create_task(call.run())
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        assert ready.draining
        assert not finished.is_set()
        call.release.set()
        await task
        await asyncio.wait_for(finished.wait(), 2)
        assert results == [True]
        assert await d.wait_finished() is True
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def test_admit_window_is_part_of_the_grace_period():
    """The grace counts from begin() and includes the window: a window longer than the grace is cut to it,
    and drain() returns within the grace even with a call that never ends."""
    d = Drainer(grace_period=0.3, admit_window=5)
    d.enter()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await d.drain() is False
    assert 0.25 <= loop.time() - t0 < 2
    with pytest.raises(DrainingError):
        d.enter()
