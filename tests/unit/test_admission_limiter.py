from __future__ import annotations

import threading

import pytest
from blazen_peer.admission import ConcurrencyLimiter


def test_limiter_refuses_without_waiting():
    lim = ConcurrencyLimiter(2)
    assert lim.try_acquire()
    assert lim.try_acquire()
    assert not lim.try_acquire()
    assert "limit of 2" in lim.message
    assert "sub-workflows" in lim.message
    lim.release()
    assert lim.try_acquire()
    assert lim.in_use == 2
    lim.release()
    lim.release()
    with pytest.raises(RuntimeError):
        lim.release()


def test_unlimited():
    lim = ConcurrencyLimiter(None)
    for _ in range(1000):
        assert lim.try_acquire()


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
