"""The one queue every reconcile trigger goes through, with the one retry policy.

BlazenPeer create/update/resume, events on owned children and the periodic resync all call
:meth:`WorkQueue.request`. Requests for one key coalesce (a burst of child events is one pass), passes for
one key never overlap, at most ``concurrency`` passes run at once, and a pass that asks for a retry runs
again after an exponential backoff that a new request cuts short (a fixed spec does not wait behind a
failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
# One pass over a key: True when done, False to be retried with backoff. An exception counts as False.
Work = Callable[[Key], Awaitable[bool]]


@dataclass(frozen=True)
class Backoff:
    initial: float = 1.0
    factor: float = 2.0
    cap: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait after the n-th consecutive failure (n >= 1)."""
        return min(self.cap, self.initial * self.factor ** max(0, failures - 1))


class WorkQueue:
    def __init__(self, work: Work, *, backoff: Backoff | None = None, concurrency: int = 8) -> None:
        self._work = work
        self._backoff = backoff or Backoff()
        self._slots = asyncio.Semaphore(concurrency)
        self._dirty: set[Key] = set()
        self._wake: dict[Key, asyncio.Event] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}

    def request(self, key: Key) -> None:
        """Ask for a pass over key: soon, once, after the one running (if any) ends."""
        self._dirty.add(key)
        wake = self._wake.get(key)
        if wake is not None:
            wake.set()
        if key not in self._tasks:
            self._wake[key] = asyncio.Event()
            self._tasks[key] = asyncio.create_task(self._worker(key), name=f"reconcile:{key[0]}/{key[1]}")

    @property
    def busy(self) -> set[Key]:
        """Keys with a pass running, pending or waiting to retry."""
        return set(self._tasks)

    async def _pass(self, key: Key) -> bool:
        async with self._slots:
            try:
                return await self._work(key)
            except Exception:
                log.exception("reconcile of %s/%s failed", *key)
                return False

    async def _worker(self, key: Key) -> None:
        failures = 0
        wake = self._wake[key]
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                wake.clear()
                if await self._pass(key):
                    failures = 0
                    continue
                failures += 1
                delay = self._backoff.delay(failures)
                log.warning("reconcile of %s/%s will retry in %.1fs", *key, delay)
                self._dirty.add(key)
                with contextlib.suppress(TimeoutError):  # a new request ends the wait early
                    await asyncio.wait_for(wake.wait(), timeout=delay)
        finally:
            self._tasks.pop(key, None)
            self._wake.pop(key, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
