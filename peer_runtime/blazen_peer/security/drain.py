"""Graceful drain: on SIGTERM stop being ready, keep admitting for a while, then let in-flight calls finish.

``Drainer`` counts in-flight calls (``enter``/``exit``, called by ``integration.py`` around each call).
``begin()`` (called when the server stops) marks the ``Readiness`` as draining, so ``/readyz`` and the gRPC
health service turn NOT_SERVING, but calls are still admitted for ``admit_window`` seconds: Kubernetes needs
that long to take the pod out of its Services' endpoints, and until it has, kube-proxy still sends new
connections here. After the window new calls are refused with UNAVAILABLE / 503 "draining" (both
retryable), except deref/release of the session refs this process holds (``enter(ref_call=True)``); the
server then closes its listeners (gRPC sends GOAWAY, so clients reconnect elsewhere; while refs are held, the
gRPC listeners stay open for those calls until the grace ends) and gives the in-flight calls what is left of
``grace_period``, which is counted from ``begin()`` and includes the window. ``finish()`` records whether
every call ended in time and sets ``finished``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import DrainingError

__all__ = ["DRAINING_MESSAGE", "Drainer"]

log = logging.getLogger("blazen_peer.security.drain")

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
        self._cond = threading.Condition()
        self._in_flight = 0
        self._began: float | None = None
        self._refuse_after: float | None = None
        self.refused = 0
        self.finished = threading.Event()
        self.clean: bool | None = None
        self._drain_task: asyncio.Task | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, str]] = []
        self._thread_waiters = 0

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
        with self._cond:
            self._in_flight += 1

    def exit(self) -> None:
        with self._cond:
            self._in_flight -= 1
            # Wake waiters only if there are any (the common case, serving, has none: keep it cheap).
            if self._in_flight <= 0 and (self._thread_waiters or self._waiters):
                self._cond.notify_all()
                self._wake("idle")

    def _wake(self, what: str) -> None:
        for loop, event, kind in list(self._waiters):
            if kind == what:
                with contextlib.suppress(RuntimeError):  # loop closed
                    loop.call_soon_threadsafe(event.set)

    async def _wait(self, what: str, done: Callable[[], bool], limit: float | None) -> bool:
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event, what)
        self._waiters.append(entry)
        try:
            if done():
                return True
            try:
                await asyncio.wait_for(event.wait(), limit)
            except TimeoutError:
                return done()
            return True
        finally:
            self._waiters.remove(entry)

    @contextmanager
    def track(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()

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
        """Record the outcome and set ``finished``. ``clean``: every call ended within the grace period
        (the server cancels what still runs when it is over, so an empty count alone proves nothing)."""
        self.clean = self._in_flight <= 0 and self.remaining() > 0
        if not self.clean:
            log.warning("grace period over: calls still in flight were cancelled")
        else:
            log.info("drained")
        self.finished.set()
        self._wake("finished")
        return self.clean

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no call is in flight (threads); False on timeout."""
        with self._cond:
            self._thread_waiters += 1
            try:
                return self._cond.wait_for(lambda: self._in_flight <= 0, timeout)
            finally:
                self._thread_waiters -= 1

    async def drain(self) -> bool:
        """The whole drain without a server: the admit window, then wait for in-flight calls until the
        grace period is over; ``finish()``. Returns True when every call ended in time."""
        await self.admit_window_over()
        await self._wait("idle", lambda: self._in_flight <= 0, self.remaining())
        return self.finish()

    async def wait_finished(self) -> bool:
        """Await the end of a drain started elsewhere (e.g. by the signal handler); returns ``clean``."""
        await self._wait("finished", self.finished.is_set, None)
        return bool(self.clean)

    def install_signal_handlers(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        signals: Iterable[int] = (signal.SIGTERM,),
        on_finished: Callable[[bool], Any] | None = None,
    ) -> None:
        """On each of ``signals``: start ``drain()`` on ``loop`` and then call ``on_finished(clean)``
        (e.g. the server's stop). A second signal while draining is ignored."""
        loop = loop or asyncio.get_running_loop()

        async def run() -> None:
            clean = await self.drain()
            if on_finished is not None:
                result = on_finished(clean)
                if asyncio.iscoroutine(result):
                    await result

        def handler() -> None:
            if self._drain_task is None:
                self._drain_task = loop.create_task(run())

        for sig in signals:
            loop.add_signal_handler(sig, handler)
