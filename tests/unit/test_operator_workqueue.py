"""The operator's one work queue: coalescing, no overlap per key, bounded concurrency, one retry policy."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from blazen_operator.workqueue import Backoff, Key, WorkQueue

A: Key = ("ns", "a")
B: Key = ("ns", "b")


async def settle(queue: WorkQueue) -> None:
    """Until no key is running, pending or waiting to retry (a generous bound: it must not hang)."""
    deadline = time.monotonic() + 5.0
    while queue.busy:
        assert time.monotonic() < deadline, f"queue still busy: {queue.busy}"
        await asyncio.sleep(0.01)


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, cap=60.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


async def test_a_burst_of_requests_while_a_pass_runs_is_one_more_pass() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    passes: list[Key] = []

    async def work(key: Key) -> bool:
        passes.append(key)
        started.set()
        await release.wait()
        return True

    queue = WorkQueue(work)
    queue.request(A)
    await started.wait()
    for _ in range(50):
        queue.request(A)
    release.set()
    await settle(queue)
    assert passes == [A, A]


async def test_passes_for_one_key_never_overlap_and_keys_run_in_parallel() -> None:
    running: dict[Key, int] = {A: 0, B: 0}
    peak: dict[Key, int] = {A: 0, B: 0}
    both = asyncio.Event()

    async def work(key: Key) -> bool:
        running[key] += 1
        peak[key] = max(peak[key], running[key])
        if running[A] and running[B]:
            both.set()
        await asyncio.sleep(0.02)
        running[key] -= 1
        return True

    queue = WorkQueue(work)
    for _ in range(5):
        queue.request(A)
        queue.request(B)
        await asyncio.sleep(0.005)
    await asyncio.wait_for(both.wait(), timeout=5)
    await settle(queue)
    assert peak == {A: 1, B: 1}


async def test_concurrency_is_bounded_across_keys() -> None:
    running = 0
    peak = 0

    async def work(key: Key) -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return True

    queue = WorkQueue(work, concurrency=3)
    for i in range(20):
        queue.request(("ns", str(i)))
    await settle(queue)
    assert peak == 3


async def test_failures_retry_with_backoff_until_success_and_exceptions_count_as_failures() -> None:
    stamps: list[float] = []

    async def work(key: Key) -> bool:
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            raise RuntimeError("boom")  # logged, retried: the queue survives
        return len(stamps) >= 3

    queue = WorkQueue(work, backoff=Backoff(initial=0.05, factor=2.0, cap=1.0))
    queue.request(A)
    await settle(queue)
    assert len(stamps) == 3
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1, "the second wait doubles"


async def test_a_new_request_cuts_a_retry_wait_short() -> None:
    calls = 0
    failed = asyncio.Event()

    async def work(key: Key) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            failed.set()
            return False
        return True

    queue = WorkQueue(work, backoff=Backoff(initial=30.0))
    queue.request(A)
    await failed.wait()
    await asyncio.sleep(0.01)  # now waiting 30 s to retry
    started = time.monotonic()
    queue.request(A)  # e.g. the spec was fixed
    await settle(queue)
    assert calls == 2
    assert time.monotonic() - started < 5


async def test_close_cancels_pending_retries() -> None:
    async def work(key: Key) -> bool:
        return False

    queue = WorkQueue(work, backoff=Backoff(initial=30.0))
    queue.request(A)
    queue.request(B)
    await asyncio.sleep(0.01)
    assert queue.busy == {A, B}
    await asyncio.wait_for(queue.close(), timeout=5)
    assert queue.busy == set()


@pytest.mark.parametrize("outcome", [True, False])
async def test_a_key_is_forgotten_once_done(outcome: bool) -> None:
    calls = 0

    async def work(key: Key) -> bool:
        nonlocal calls
        calls += 1
        return outcome or calls > 1

    queue = WorkQueue(work, backoff=Backoff(initial=0.01))
    queue.request(A)
    await settle(queue)
    assert queue.busy == set()
    assert calls == (1 if outcome else 2)


def new_keys(count: int) -> list[Key]:
    return [("ns", f"new-{i:03d}") for i in range(count)]


@pytest.mark.parametrize("when", ["during its pass", "after its pass"])
async def test_a_follow_up_pass_goes_before_queued_first_passes(when: str) -> None:
    """1,000 BlazenPeers created at once: the pass that sees a peer's children Ready (and sets Ready) must not
    wait behind the first passes of every peer created after it."""
    order: list[Key] = []
    gate = asyncio.Event()
    queued = new_keys(50)

    async def work(key: Key) -> bool:
        order.append(key)
        if len(order) == (1 if when == "during its pass" else 2):
            await gate.wait()  # the slot is busy while 50 new keys arrive
        return True

    queue = WorkQueue(work, concurrency=1)
    queue.request(A)
    if when == "after its pass":
        await settle(queue)
        queue.request(B)  # another key's first pass holds the one slot
    await asyncio.sleep(0.01)
    for key in queued:
        queue.request(key)
    queue.request(A, follow_up=True)  # A's children changed
    gate.set()
    await settle(queue)
    first = [A] if when == "during its pass" else [A, B]
    assert order == [*first, A, *queued]


async def test_a_follow_up_request_moves_a_waiting_first_pass_ahead() -> None:
    order: list[Key] = []
    gate = asyncio.Event()
    queued = new_keys(20)

    async def work(key: Key) -> bool:
        order.append(key)
        if len(order) == 1:
            await gate.wait()
        return True

    queue = WorkQueue(work, concurrency=1)
    queue.request(A)
    await asyncio.sleep(0.01)
    for key in queued:
        queue.request(key)
    queue.request(queued[-1], follow_up=True)  # e.g. the operator restarted: the children already exist
    gate.set()
    await settle(queue)
    assert order == [A, queued[-1], *queued[:-1]]


async def test_first_passes_are_not_starved_by_a_stream_of_follow_ups() -> None:
    """A follow-up pass that always brings another (children that never stop changing) still lets first
    passes through: at most ``follow_up_burst`` follow-ups in a row while a first pass waits."""
    order: list[tuple[Key, bool]] = []
    burst = 3
    queued = new_keys(10)
    stop = asyncio.Event()

    async def work(key: Key) -> bool:
        follow_up = key[1].startswith("busy")
        order.append((key, follow_up))
        await asyncio.sleep(0)
        if follow_up and not stop.is_set():
            queue.request(("ns", f"busy-{len(order)}"), follow_up=True)
        if all(k in {o[0] for o in order} for k in queued):
            stop.set()
        return True

    queue = WorkQueue(work, concurrency=1, follow_up_burst=burst)
    queue.request(("ns", "busy-0"), follow_up=True)
    queue.request(("ns", "busy-x"), follow_up=True)  # two in flight: the follow-up level is never empty
    for key in queued:
        queue.request(key)
    await settle(queue)
    del order[0]  # busy-0 took the free slot before anything waited
    firsts = [i for i, (_, follow_up) in enumerate(order) if not follow_up]
    assert [order[i][0] for i in firsts] == queued, "first passes keep their order"
    gaps = [b - a - 1 for a, b in itertools.pairwise([-1, *firsts])]
    assert max(gaps) <= burst, gaps
    assert gaps[1:] == [burst] * (len(queued) - 1), "follow-ups still go first, up to the burst"


async def test_a_pass_cancelled_while_waiting_for_a_slot_gives_nothing_away() -> None:
    gate = asyncio.Event()
    passes: list[Key] = []

    async def work(key: Key) -> bool:
        passes.append(key)
        await gate.wait()
        return True

    queue = WorkQueue(work, concurrency=1)
    queue.request(A)
    queue.request(B, follow_up=True)
    await asyncio.sleep(0.01)
    await asyncio.wait_for(queue.close(), timeout=5)
    assert queue.busy == set()
    # the queue still works and its one slot is free again
    gate.set()
    queue.request(A)
    queue.request(B)
    await settle(queue)
    assert passes == [A, A, B]


async def test_concurrency_passes_really_run_at_once() -> None:
    """``--concurrency 8`` on 2 cores: asyncio's default pool (min(32, CPUs + 4) threads) would hold 6 of the
    8 passes the queue lets run, so the operator gives passes a pool of their own at startup."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from blazen_operator.handlers import Options, use_pass_threads

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=6))  # what 2 cores get by default
    use_pass_threads(loop, Options(concurrency=8))
    together = threading.Barrier(2 * 8, timeout=10)  # both queues' passes at once
    await asyncio.gather(*(asyncio.to_thread(together.wait) for _ in range(2 * 8)))
