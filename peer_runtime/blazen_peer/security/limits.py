"""The concurrent sub-workflow limit.

``ConcurrencyLimiter`` never queues: a call over the limit is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429) with a message naming the limit, so the caller can back off or go to
another replica. Which calls it applies to is the caller's choice (``integration.LIMITED_METHODS``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import LimitExceededError

__all__ = [
    "ConcurrencyLimiter",
]


class ConcurrencyLimiter:
    """At most ``limit`` concurrent sub-workflows (None or 0: unlimited). Thread-safe, non-blocking."""

    def __init__(
        self,
        limit: int | None,
        *,
        name: str = "concurrent sub-workflows",
    ) -> None:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit or None
        self.name = name
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

    def occupy(self) -> None:
        """Take a slot even over the limit: for work that is already running (a step that outlived its
        run, see engine/executor.py); ``release()`` it when that work ends."""
        with self._lock:
            self.in_use += 1

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
