from __future__ import annotations

import asyncio

import pytest
from blazen_peer.admin.drain import DRAINING_MESSAGE, Drainer
from blazen_peer.admin.readiness import Readiness
from blazen_peer.wire.errors import DrainingError, Status


class FakeCall:
    """An in-flight call that ends when told to."""

    def __init__(self, drainer: Drainer) -> None:
        self.drainer = drainer
        self.release = asyncio.Event()

    async def run(self) -> str:
        self.drainer.enter()
        try:
            await self.release.wait()
        finally:
            self.drainer.exit()
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
    assert d.clean is None
    with pytest.raises(DrainingError) as ei:
        d.enter()
    assert ei.value.status is Status.UNAVAILABLE
    assert ei.value.status.http == 503
    assert ei.value.message == DRAINING_MESSAGE
    assert d.refused == 1
    call.release.set()
    assert await task == "done"
    assert await asyncio.wait_for(drain, 2) is True
    assert d.clean is True


async def test_grace_period_bounds_the_wait():
    d = Drainer(grace_period=0.2)
    d.enter()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await d.drain() is False
    assert 0.15 <= loop.time() - t0 < 2
    assert d.clean is False


async def test_admit_window_keeps_accepting_briefly():
    d = Drainer(grace_period=1, admit_window=0.2)
    d.begin()
    d.enter()  # still admitted: endpoints take a moment to drop the pod
    d.exit()
    await asyncio.sleep(0.25)
    with pytest.raises(DrainingError):
        d.enter()


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
