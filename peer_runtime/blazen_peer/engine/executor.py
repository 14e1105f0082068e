"""``StepExecutor``: the threads plain-``def`` steps run on, bounded and accounted for.

A run that ends (timeout, client cancellation, a failed sibling step) cannot stop a thread: the step goes on
in the background as an *orphan*. Orphans are counted two ways so they cannot starve the peer:

* each one holds a slot of the concurrency limiter (``slots``, the ``--max-concurrent-workflows`` limiter)
  until its thread returns, so the limiter sees the work that is still going on;
* when every thread is busy, a new sync step is refused at once (``StepWorkersSaturated``, which the
  service answers RESOURCE_EXHAUSTED / 429) rather than queued behind threads that may never come back.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ..wire.errors import PeerError, exception_text


class StepWorkersSaturated(PeerError):
    """Every step thread is busy; the call answers RESOURCE_EXHAUSTED with this message."""


class StepBaseException(PeerError):
    """A sync step raised a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``GeneratorExit`` ...); it crosses to the event loop as this, because such an exception set on an asyncio
    future can escape the coroutines that await it (grpc.aio's handler task ended with a step's
    ``GeneratorExit`` and the call hung). ``str()`` is ``exception_text`` of the original."""


class Slots(Protocol):
    """What ``StepExecutor`` needs of the concurrency limiter."""

    def occupy(self) -> None: ...

    def release(self) -> None: ...


def default_workers(max_concurrent_workflows: int | None) -> int:
    """As many threads as admitted runs (so a sync step of an admitted run never waits for a thread unless
    the run fans out), and never fewer than Python's own default."""
    return max(min(32, (os.cpu_count() or 1) + 4), max_concurrent_workflows or 0)


class _Job:
    __slots__ = ("finished", "orphaned")

    def __init__(self) -> None:
        self.finished = False
        self.orphaned = False


class StepExecutor:
    def __init__(self, workers: int, *, slots: Slots | None = None) -> None:
        if workers < 1:
            raise ValueError("a step executor needs at least one thread")
        self.workers = workers
        self.slots = slots
        self.busy = 0  #: threads running a step, orphans included
        self.orphans = 0  #: threads running a step whose run has ended
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blazen-step")

    @property
    def message(self) -> str:
        return (
            f"all {self.workers} sync step threads are busy ({self.orphans} of them running steps of runs "
            "that already ended): retry later (--sync-step-workers)"
        )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a step thread, in the caller's context (log records keep its caller node id and
        request id); ``StepWorkersSaturated`` when no thread is free."""
        with self._lock:
            if self.busy >= self.workers:
                raise StepWorkersSaturated(self.message)
            self.busy += 1
        job = _Job()
        try:
            cf = self._pool.submit(self._work, job, contextvars.copy_context().run, fn, args)
        except RuntimeError:  # shut down
            with self._lock:
                self.busy -= 1
            raise
        try:
            return await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            if cf.cancel():  # never started: _work will not run
                with self._lock:
                    self.busy -= 1
            else:
                self._orphan(job)
            raise

    def _work(self, job: _Job, run: Callable[..., Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return run(fn, *args)
        except Exception:
            raise
        except BaseException as exc:
            raise StepBaseException(exception_text(exc)) from exc
        finally:
            with self._lock:
                self.busy -= 1
                job.finished = True
                if job.orphaned:
                    self.orphans -= 1
                    if self.slots is not None:
                        self.slots.release()

    def _orphan(self, job: _Job) -> None:
        with self._lock:
            if job.finished:
                return
            job.orphaned = True
            self.orphans += 1
            if self.slots is not None:
                self.slots.occupy()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
