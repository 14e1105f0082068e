"""The operator's own watches of its children, outside kopf: one thread per child kind.

kopf hands every event to a per-object worker task and queues the decoded object there until its event loop
gets to it; with ~12,000 children at 1,000 BlazenPeers, the events of a burst piled up as whole objects
(``managedFields``, specs, statuses) and were most of the operator's peak memory (docs/benchmarks.md). Here
each event is turned into the cache's compact record (cache.py) as soon as it is read, the owners' passes are
requested, and the object is dropped.

Each watch lists its kind once by label, in pages (the cache then knows it is complete: ``synced``), then
watches from the list's resourceVersion with bookmarks, resuming from the last resourceVersion it saw when
the stream ends or breaks. A 410 Gone (that resourceVersion is compacted away) lists again, and records the
list did not return are dropped as deleted. A stream that delivers nothing, not even a bookmark, for
``inactivity_seconds`` is presumed frozen and reconnected; a watch that has not been connected and
delivering for ``2 * inactivity_seconds`` is reported dead to the liveness probe (handlers.api_health), so
the kubelet restarts an operator whose watches cannot recover.

The watches read through their own :class:`~.apply.Api` (the operator's one client, a pool of its own so
long-lived streams never hold the passes' connections).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from . import metrics
from .apply import ApiError, Paged
from .cache import ChildCache, ChildKey, Live
from .kinds import MANAGED_SELECTOR, ManagedKind

log = logging.getLogger(__name__)

SERVER_TIMEOUT = 300  # the API server ends each watch after this long; it is resumed from its resourceVersion
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)  # after lists or watch requests that failed, one after another


class WatchApi(Protocol):
    """What a watch needs of :class:`~.apply.Api` (a fake in the unit tests)."""

    def request(
        self, method: str, path: str, *, query: dict[str, Any] | None = ..., what: str = ...
    ) -> dict[str, Any]: ...

    def watch(
        self,
        api_version: str,
        kind: str,
        label_selector: str,
        resource_version: str,
        *,
        server_timeout: int,
        inactivity_timeout: float,
    ) -> Iterator[dict[str, Any]]: ...


# the owners of a child whose record changed or went: called in the watch's thread
Changed = Callable[[dict[str, Any]], None]


class Gone(Exception):
    """410: the resourceVersion to resume from is no longer available; list again."""


class ChildWatch:
    """List, then watch, one child kind (every namespace, our label only) into the cache."""

    def __init__(
        self,
        api: WatchApi,
        kind: ManagedKind,
        cache: ChildCache,
        changed: Changed,
        inactivity_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.kind = kind
        self.cache = cache
        self.changed = changed
        self.inactivity_seconds = inactivity_seconds
        self.clock = clock
        self.resource_version: str | None = None  # where the next watch resumes; None: list first
        self.last_alive = clock()  # the last time the API answered this watch (a list, a stream, an event)
        self.lists = 0
        self.connected_at: float | None = None  # when the current attempt's watch request was answered
        self.thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{self.kind.kind} watch"

    def dead_for(self) -> float:
        """Seconds since the watch last heard from the API server beyond what a live one ever goes
        without (0: alive)."""
        silent = self.clock() - self.last_alive
        return silent if silent > 2 * self.inactivity_seconds else 0.0

    # ---------------------------------------------------------------------------------------- the loop
    def run(self, stop: threading.Event) -> None:
        failures = 0  # attempts in a row that failed without a stream that lasted: they back off
        while not stop.is_set():
            self.connected_at = None
            try:
                if self.resource_version is None:
                    self.relist()
                self.stream(stop)
                failures = 0
            except Gone:
                log.info("%s: resourceVersion %s expired; listing again", self.name, self.resource_version)
                self.resource_version = None
            except Exception as exc:  # a broken, frozen or refused connection: resume where it stopped
                log.warning("%s failed (%s); retrying", self.name, exc)
                metrics.WATCH_FAILURES.labels(kind=self.kind.kind).inc()
                lasted = self.connected_at is not None and self.clock() - self.connected_at > 1.0
                if lasted:  # a stream that had been working went quiet or broke: reopened at once
                    failures = 0
                    continue
                stop.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1

    def relist(self) -> None:
        """Every labelled object of the kind, page by page, into the cache; records the list did not return
        are dropped (deleted while nobody watched)."""
        seen: set[ChildKey] = set()
        listing = Paged(
            self.api.request,
            self.kind.api_version,
            self.kind.kind,
            None,
            MANAGED_SELECTOR,
            restarted=seen.clear,  # an expired continue token: the list starts over
        )
        for obj in listing:
            self.alive()
            seen.add(ChildCache.key(obj))
            self.observe(obj)
        self.alive()
        for rec in self.cache.retain(self.kind.api_version, self.kind.kind, seen):
            self.changed(rec.obj)
        self.resource_version = listing.resource_version
        self.cache.mark_synced(self.kind.api_version, self.kind.kind)
        self.lists += 1
        metrics.WATCH_LISTS.labels(kind=self.kind.kind).inc()

    def stream(self, stop: threading.Event) -> None:
        """One watch connection, from ``resource_version`` until the API server ends it (or ``stop``)."""
        events = self.api.watch(
            self.kind.api_version,
            self.kind.kind,
            MANAGED_SELECTOR,
            self.resource_version or "",
            server_timeout=SERVER_TIMEOUT,
            inactivity_timeout=self.inactivity_seconds,
        )
        self.alive()  # connected: the API server answered
        self.connected_at = self.clock()
        try:
            for event in events:
                self.alive()
                self.handle(event)
                if stop.is_set():
                    return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        self.alive()  # ended by the API server: a live connection

    def handle(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message", ""))
            raise ApiError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        if kind == "DELETED":
            self.cache.forget(obj)
            self.changed(obj)
        elif kind in ("ADDED", "MODIFIED"):
            self.observe(obj)
        if rv:
            self.resource_version = rv

    def observe(self, obj: dict[str, Any]) -> Live | None:
        """Into the cache; the owners hear of it when the record moved (a list repeats what is known)."""
        before = self.cache.get(*ChildCache.key(obj))
        rec = self.cache.observe(obj)
        if rec is not None and (before is None or before.resource_version != rec.resource_version):
            self.changed(rec.obj)
        return rec

    def alive(self) -> None:
        self.last_alive = self.clock()


class ChildWatches:
    """The watch threads of every child kind, and what the liveness probe asks of them."""

    def __init__(
        self,
        api: WatchApi,
        kinds: Iterable[ManagedKind],
        cache: ChildCache,
        changed: Changed,
        inactivity_seconds: float,
    ) -> None:
        self.watches = [ChildWatch(api, k, cache, changed, inactivity_seconds) for k in kinds]
        self._stop = threading.Event()

    def start(self) -> None:
        for watch in self.watches:
            watch.thread = threading.Thread(
                target=watch.run, args=(self._stop,), daemon=True, name=f"watch-{watch.kind.plural}"
            )
            watch.thread.start()

    def stop(self) -> None:
        """Each thread ends after its current read (at most the inactivity timeout): not waited for."""
        self._stop.set()

    def dead(self) -> list[str]:
        """What the probe reports: each watch that has not heard from the API server for too long."""
        return [f"{w.name} silent for {w.dead_for():.0f}s" for w in self.watches if w.dead_for()]
