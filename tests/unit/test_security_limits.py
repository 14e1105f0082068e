from __future__ import annotations

import threading

import grpc
import pytest
from blazen_peer.security.errors import LimitExceededError, PeerRejected, RequestTooLargeError
from blazen_peer.security.limits import (
    MAX_MESSAGE_BYTES,
    ConcurrencyLimiter,
    check_request_size,
    ref_cache_bytes_message,
    ref_cache_count_message,
)


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


def test_unlimited_and_method_filter():
    lim = ConcurrencyLimiter(None)
    for _ in range(1000):
        assert lim.try_acquire()
    one = ConcurrencyLimiter(1)
    assert one.enter("/blazen.peer.v1.BlazenPeer/DerefSessionRef") is False  # not limited
    assert one.enter("/v1/peer/invoke_sub_workflow") is True
    with pytest.raises(LimitExceededError):
        one.enter("/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow")
    one.exit(True, grpc.StatusCode.OK)
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


def test_request_size():
    check_request_size(MAX_MESSAGE_BYTES)
    with pytest.raises(RequestTooLargeError) as ei:
        check_request_size(MAX_MESSAGE_BYTES + 1)
    assert isinstance(ei.value, PeerRejected)
    assert ei.value.grpc_code == grpc.StatusCode.OUT_OF_RANGE
    assert ei.value.http_status == 413
    assert str(ei.value) == (
        f"Error, decoded message length too large: found {MAX_MESSAGE_BYTES + 1} bytes, "
        f"the limit is: {MAX_MESSAGE_BYTES} bytes"
    )


def test_ref_cache_messages_name_the_limits():
    assert "10000 refs" in ref_cache_count_message(10000)
    msg = ref_cache_bytes_message(2048, 1000, 2500)
    assert "2048-byte" in msg
    assert "1000 of the 2500 bytes" in msg
