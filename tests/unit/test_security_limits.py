from __future__ import annotations

import threading

import grpc
import pytest
from blazen_peer.security.errors import LimitExceededError
from blazen_peer.security.limits import ConcurrencyLimiter


def test_limiter_refuses_without_waiting():
    lim = ConcurrencyLimiter(2)
    assert lim.try_acquire()
    assert lim.try_acquire()
    assert not lim.try_acquire()
    with pytest.raises(LimitExceededError) as ei:
        lim.acquire()
    assert ei.value.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.http_status == 429
    assert "limit of 2" in ei.value.message
    assert "sub-workflows" in ei.value.message
    assert lim.rejected == 2
    lim.release()
    with lim.slot():
        assert lim.in_use == 2
    assert lim.in_use == 1
    lim.release()
    with pytest.raises(RuntimeError):
        lim.release()


def test_unlimited_and_acquire():
    lim = ConcurrencyLimiter(None)
    for _ in range(1000):
        assert lim.try_acquire()
    one = ConcurrencyLimiter(1)
    one.acquire()
    with pytest.raises(LimitExceededError):
        one.acquire()
    one.release()
    assert one.in_use == 0


def test_limiter_is_exact_under_threads():
    lim = ConcurrencyLimiter(5)
    granted = []
    barrier = threading.Barrier(20)

    def worker():
        barrier.wait()
        granted.append(lim.try_acquire())

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 5
    assert lim.in_use == 5
