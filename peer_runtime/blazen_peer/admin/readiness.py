"""``Readiness``: one small object that ``/readyz``, ``/v1/info`` and the gRPC health service read.

Not ready until ``set_ready()`` (the server calls it once the entrypoint is loaded and every listener
is bound); not ready again once ``set_draining()`` is called (SIGTERM), for good; not ready either while
``set_blocker(reason)`` holds a reason (a router whose pools have no live replica), until
``set_blocker(None)``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Readiness"]

log = logging.getLogger("blazen_peer.admin.readiness")


class Readiness:
    def __init__(self) -> None:
        self._started = False
        self._draining = False
        self._blocker: str | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def ready(self) -> bool:
        return self._started and not self._draining and self._blocker is None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def reason(self) -> str:
        if self._draining:
            return "draining"
        if not self._started:
            return "starting"
        return self._blocker or "ready"

    def add_listener(self, callback: Callable[[bool], None]) -> None:
        """``callback(ready)`` after every change (from the thread that made it)."""
        self._listeners.append(callback)

    def set_ready(self, ready: bool = True) -> None:
        self._change(lambda: setattr(self, "_started", ready))

    def set_draining(self) -> None:
        self._change(lambda: setattr(self, "_draining", True))

    def set_blocker(self, reason: str | None) -> None:
        """Not ready while ``reason`` is set (it is ``reason``'s text); ``None`` lifts it."""
        self._change(lambda: setattr(self, "_blocker", reason))

    def _change(self, mutate: Callable[[], None]) -> None:
        with self._lock:
            before = self.ready
            mutate()
            after = self.ready
        if before != after:
            log.info("readiness: %s", self.reason)
            for cb in list(self._listeners):
                try:
                    cb(after)
                except Exception:
                    log.exception("readiness listener failed")
