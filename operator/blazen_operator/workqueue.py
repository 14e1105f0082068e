"""The one queue every reconcile trigger goes through, with the one retry policy.

BlazenPeer create/update/resume, events on owned children and the periodic resync all call
:meth:`WorkQueue.request`. Requests for one key coalesce (a burst of child events is one pass), passes for
one key never overlap, at most ``concurrency`` passes run at once, and a pass that asks for a retry runs
again after an exponential backoff that a new request cuts short (a fixed spec does not wait behind a
failure).

Passes wait for a slot at one of two levels. A follow-up (its children changed: it has been reconciled
before) goes before a first pass or a periodic one: when 1,000 BlazenPeers are created at once, the pass
that sees a peer's pods Ready and sets ``Ready`` would otherwise wait behind the first passes of every peer
created after it, and no peer would be Ready before all of them had their children. Follow-ups are cheap
(the children are cached and mostly unchanged), but a stream of them must not stop first passes: while a
first pass waits, at most ``follow_up_burst`` follow-ups in a row take a slot before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
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
    def __init__(
        self,
        work: Work,
        *,
        backoff: Backoff | None = None,
        concurrency: int = 8,
        follow_up_burst: int = 4,
    ) -> None:
        self._work = work
        self._backoff = backoff or Backoff()
        self._free = concurrency
        self._burst = follow_up_burst
        self._streak = 0  # follow-ups given a slot in a row while a first pass waited
        # keys waiting for a slot, oldest first, with the future that hands it over: follow-ups, first passes
        self._follow_ups: OrderedDict[Key, asyncio.Future[None]] = OrderedDict()
        self._firsts: OrderedDict[Key, asyncio.Future[None]] = OrderedDict()
        self._dirty: set[Key] = set()
        self._follow_up: set[Key] = set()  # the next pass of these keys is a follow-up
        self._wake: dict[Key, asyncio.Event] = {}
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self.completed = 0  # passes run to their end, failed ones included (memory.Trimmer watches it)

    def request(self, key: Key, *, follow_up: bool = False) -> None:
        """Ask for a pass over key: soon, once, after the one running (if any) ends. ``follow_up``: the key
        has been reconciled before and something it owns changed (its pass goes before first passes)."""
        self._dirty.add(key)
        if follow_up:
            self._follow_up.add(key)
            waiter = self._firsts.pop(key, None)
            if waiter is not None:
                self._follow_ups[key] = waiter
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

    def _line_up(self, key: Key) -> asyncio.Future[None]:
        """A future that is done when key has a slot: at once if one is free and nobody waits."""
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._free and not self._follow_ups and not self._firsts:
            self._free -= 1
            slot.set_result(None)
        else:
            (self._follow_ups if key in self._follow_up else self._firsts)[key] = slot
        return slot

    def _release(self) -> None:
        """Hand the freed slot to the next waiter: a follow-up unless first passes have waited out a burst."""
        while self._follow_ups or self._firsts:
            if self._follow_ups and not (self._firsts and self._streak >= self._burst):
                _, slot = self._follow_ups.popitem(last=False)
                self._streak = self._streak + 1 if self._firsts else 0
            else:
                _, slot = self._firsts.popitem(last=False)
                self._streak = 0
            if not slot.done():  # cancelled with its worker, which has not yet run to take it out of line
                slot.set_result(None)
                return
        self._free += 1

    async def _run(self, key: Key) -> bool:
        try:
            return await self._work(key)
        except Exception:
            log.exception("reconcile of %s/%s failed", *key)
            return False

    async def _worker(self, key: Key) -> None:
        failures = 0
        wake = self._wake[key]
        slot: asyncio.Future[None] | None = self._line_up(key)
        try:
            while slot is not None:
                await slot
                # requests that came while waiting for the slot are served by this pass
                self._dirty.discard(key)
                follow_up = key in self._follow_up
                self._follow_up.discard(key)
                wake.clear()
                done = await self._run(key)
                self.completed += 1
                # requested again during the pass: in line before the slot is handed on, so that a follow-up
                # takes it straight back
                again = self._line_up(key) if done and key in self._dirty else None
                self._release()
                slot = again
                if done:
                    failures = 0
                    continue
                failures += 1
                delay = self._backoff.delay(failures)
                log.warning("reconcile of %s/%s will retry in %.1fs", *key, delay)
                self._dirty.add(key)
                if follow_up:  # its retry keeps its level
                    self._follow_up.add(key)
                with contextlib.suppress(TimeoutError):  # a new request ends the wait early
                    await asyncio.wait_for(wake.wait(), timeout=delay)
                slot = self._line_up(key)
        finally:
            if slot is not None:
                if slot.done() and not slot.cancelled():  # holding a slot (or handed one): pass it on
                    self._release()
                else:
                    for line in (self._follow_ups, self._firsts):
                        if line.get(key) is slot:
                            del line[key]
                    slot.cancel()
            self._tasks.pop(key, None)
            self._wake.pop(key, None)
            self._follow_up.discard(key)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
