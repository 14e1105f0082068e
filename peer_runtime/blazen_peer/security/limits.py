"""Resource limits: concurrent sub-workflows, request size, and the session-ref cache messages.

``ConcurrencyLimiter`` never queues: a call over the limit is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429) with a message naming the limit, so the caller can back off or go to
another replica. It is a guard (``enter``/``exit``, see ``guard.py``) restricted to the methods that
start a sub-workflow.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import LimitExceededError, RequestTooLargeError

__all__ = [
    "INVOKE_METHODS",
    "MAX_MESSAGE_BYTES",
    "ConcurrencyLimiter",
    "check_request_size",
    "ref_cache_bytes_message",
    "ref_cache_count_message",
    "request_too_large_message",
]

#: tonic's default decode limit, which Blazen's client and server both apply.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: the calls that start a sub-workflow, on both transports.
INVOKE_METHODS = frozenset({"/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow", "/v1/peer/invoke_sub_workflow"})


class ConcurrencyLimiter:
    """At most ``limit`` concurrent sub-workflows (None or 0: unlimited). Thread-safe, non-blocking."""

    def __init__(
        self,
        limit: int | None,
        *,
        name: str = "concurrent sub-workflows",
        methods: Iterable[str] | None = INVOKE_METHODS,
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit or None
        self.name = name
        self._methods = frozenset(methods) if methods is not None else None
        self._lock = threading.Lock()
        self.in_use = 0
        self.rejected = 0

    @property
    def message(self) -> str:
        return f"too many {self.name}: the limit of {self.limit} is reached, retry later"

    def try_acquire(self) -> bool:
        if self.limit is None:
            with self._lock:
                self.in_use += 1
            return True
        with self._lock:
            if self.in_use >= self.limit:
                self.rejected += 1
                return False
            self.in_use += 1
            return True

    def release(self) -> None:
        with self._lock:
            if self.in_use <= 0:
                raise RuntimeError("release() without a matching acquire")
            self.in_use -= 1

    def acquire(self) -> None:
        """``try_acquire`` or raise ``LimitExceededError``."""
        if not self.try_acquire():
            raise LimitExceededError(self.message)

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # guard protocol
    def enter(self, method: str) -> bool:
        if self._methods is not None and method not in self._methods:
            return False
        self.acquire()
        return True

    def exit(self, acquired: bool, code: object) -> None:
        if acquired:
            self.release()


def request_too_large_message(size: int, limit: int = MAX_MESSAGE_BYTES) -> str:
    """tonic's wording, which Blazen clients already show for this case."""
    return f"Error, decoded message length too large: found {size} bytes, the limit is: {limit} bytes"


def check_request_size(size: int, limit: int = MAX_MESSAGE_BYTES) -> None:
    """Raise ``RequestTooLargeError`` (OUT_OF_RANGE / 413) when ``size`` exceeds ``limit``."""
    if size > limit:
        raise RequestTooLargeError(request_too_large_message(size, limit))


def ref_cache_count_message(limit: int) -> str:
    """Message for a session ref refused because the cache holds ``limit`` refs already."""
    return f"session ref cache is full: it holds the maximum of {limit} refs; release refs and retry"


def ref_cache_bytes_message(size: int, held: int, limit: int) -> str:
    """Message for a session ref of ``size`` bytes refused with ``held`` of ``limit`` bytes in use."""
    return (
        f"session ref cache is full: a {size}-byte ref does not fit, {held} of the {limit} bytes "
        "allowed are held; release refs and retry"
    )
