"""Graceful drain: on SIGTERM stop being ready, keep admitting for a while, then let in-flight calls finish.

``Drainer`` counts in-flight calls (``enter``/``exit``, called by the admission around each call).
``begin()`` (called when the server stops) marks the ``Readiness`` as draining, so ``/readyz`` and the gRPC
health service turn NOT_SERVING, but calls are still admitted for ``admit_window`` seconds: Kubernetes needs
that long to take the pod out of its Services' endpoints, and until it has, kube-proxy still sends new
connections here. After the window new calls are refused with UNAVAILABLE / 503 "draining" (both
retryable), except deref/release of the session refs this process holds (``enter(ref_call=True)``); the
server then closes its listeners (gRPC sends GOAWAY, so clients reconnect elsewhere; while refs are held, the
gRPC listeners stay open for those calls until the grace ends) and gives the in-flight calls what is left of
``grace_period``, which is counted from ``begin()`` and includes the window. ``finish()`` records whether
every call ended in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..wire.errors import DrainingError

__all__ = ["DRAINING_MESSAGE", "Drainer"]

log = logging.getLogger("blazen_peer.admin.drain")

DRAINING_MESSAGE = "draining: this peer is shutting down, retry on another replica"


class Drainer:
    def __init__(
        self,
        readiness: Any | None = None,
        *,
        grace_period: float = 25.0,
        admit_window: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.readiness = readiness
        self.grace_period = grace_period
        self.admit_window = admit_window
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._began: float | None = None
        self._refuse_after: float | None = None
        self.refused = 0
        #: after ``finish()``: True when every call ended within the grace period.
        self.clean: bool | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._refuse_after is not None

    # -- per call -------------------------------------------------------------------------------------
    def enter(self, *, ref_call: bool = False) -> None:
        """Count a call in; refused after the admit window, except a ``ref_call`` (deref/release): the
        refs live only in this process, so it answers for them as long as it still listens."""
        refuse_after = self._refuse_after
        if refuse_after is not None and not ref_call and self._clock() >= refuse_after:
            self.refused += 1
            raise DrainingError(DRAINING_MESSAGE)
        with self._lock:
            self._in_flight += 1

    def exit(self) -> None:
        with self._lock:
            self._in_flight -= 1
            # Wake waiters only if there are any (the common case, serving, has none: keep it cheap).
            if self._in_flight <= 0 and self._waiters:
                self._wake()

    def _wake(self) -> None:
        for loop, event in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(event.set)

    async def _wait_idle(self, limit: float | None) -> bool:
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        self._waiters.append(entry)
        try:
            if self._in_flight <= 0:
                return True
            try:
                await asyncio.wait_for(event.wait(), limit)
            except TimeoutError:
                return self._in_flight <= 0
            return True
        finally:
            self._waiters.remove(entry)

    # -- shutdown -------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start draining (idempotent): not ready from now on, new calls refused after the window."""
        if self._refuse_after is not None:
            return
        self._began = self._clock()
        self._refuse_after = self._began + min(self.admit_window, self.grace_period)
        if self.readiness is not None:
            self.readiness.set_draining()
        log.info(
            "draining: %d call(s) in flight, admitting for %.1f s, grace period %.1f s",
            self._in_flight,
            self._refuse_after - self._began,
            self.grace_period,
        )

    def remaining(self) -> float:
        """Seconds left of the grace period (the whole period before ``begin()``)."""
        if self._began is None:
            return self.grace_period
        return max(0.0, self._began + self.grace_period - self._clock())

    async def admit_window_over(self) -> None:
        """``begin()``, then sleep until the admit window has passed (new calls are refused from then on)."""
        self.begin()
        assert self._refuse_after is not None
        delay = self._refuse_after - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    def finish(self) -> bool:
        """Record the outcome in ``clean``: every call ended within the grace period
        (the server cancels what still runs when it is over, so an empty count alone proves nothing)."""
        self.clean = self._in_flight <= 0 and self.remaining() > 0
        if not self.clean:
            log.warning("grace period over: calls still in flight were cancelled")
        else:
            log.info("drained")
        return self.clean

    async def drain(self) -> bool:
        """The whole drain without a server: the admit window, then wait for in-flight calls until the
        grace period is over; ``finish()``. Returns True when every call ended in time."""
        await self.admit_window_over()
        await self._wait_idle(self.remaining())
        return self.finish()
