"""The concurrent sub-workflow limit.

``ConcurrencyLimiter`` never queues: a call over the limit is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429) with a message naming the limit, so the caller can back off or go to
another replica. It is a guard (``enter``/``exit``, see ``guard.py``) restricted to the methods that
start a sub-workflow.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from .errors import LimitExceededError

__all__ = [
    "INVOKE_METHODS",
    "ConcurrencyLimiter",
]

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
