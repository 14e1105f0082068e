"""Session refs: values a step keeps on this peer, addressed by UUID, fetched later with Deref.

A ref's payload is serialized when it is inserted (so the bytes cap is enforced up front and a Deref never
runs user code). Lifetimes:

* ``UntilContextDrop`` (the default for ``insert``): dropped when the sub-workflow that created it ends,
  however it ends (result, error, timeout, cancellation). A step still running after its run ended (a
  plain ``def`` step past the timeout) cannot insert any more: ``SessionRefError``.
* ``UntilParentFinish``: kept until released, or until ``parent_ttl_secs`` after creation (when set).
* ``UntilExplicitDrop``: kept until released.

All entries count against ``max_count`` and ``max_bytes``; an insert beyond either raises
``SessionRefLimitError`` (its message names ``--ref-max-count`` / ``--ref-max-bytes``). A step may catch it;
if it escapes the step, the whole call answers RESOURCE_EXHAUSTED / 429 with that message.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import struct
import threading
import time
import uuid as _uuid
from collections.abc import Callable
from typing import Any

from ..wire.errors import PeerError, exception_text

REF_MARKER = "__blazen_session_ref__"


class RefLifetime(enum.Enum):
    UntilContextDrop = "until_context_drop"
    UntilParentFinish = "until_parent_finish"
    UntilExplicitDrop = "until_explicit_drop"

    @classmethod
    def parse(cls, value: RefLifetime | str) -> RefLifetime:
        if isinstance(value, RefLifetime):
            return value
        for member in cls:
            if value in (member.name, member.value):
                return member
        raise ValueError(f"unknown ref lifetime {value!r}; expected one of {[m.name for m in cls]}")


class SessionRefError(PeerError, RuntimeError):
    pass


class SessionRefLimitError(SessionRefError):
    pass


class SessionRefHandle:
    """What ``insert`` returns. JSON-encodes (in a result or a streamed event) as the ref marker."""

    __slots__ = ("lifetime", "type_tag", "uuid")

    def __init__(self, uuid: str, type_tag: str, lifetime: RefLifetime) -> None:
        self.uuid = uuid
        self.type_tag = type_tag
        self.lifetime = lifetime

    @property
    def marker(self) -> dict[str, str]:
        return {REF_MARKER: self.uuid}

    def __str__(self) -> str:
        return self.uuid

    def __repr__(self) -> str:
        return f"SessionRefHandle({self.uuid!r}, type_tag={self.type_tag!r}, lifetime={self.lifetime.name})"


class _Entry:
    __slots__ = (
        "created_at_ms",
        "expires_at",
        "lifetime",
        "payload",
        "run_id",
        "size",
        "type_tag",
        "uuid",
        "value",
    )
    created_at_ms: int
    expires_at: float | None
    lifetime: RefLifetime
    payload: bytes | None
    run_id: str | None
    size: int
    type_tag: str
    uuid: str
    value: Any

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


def type_tag_of(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def blazen_object_payload(value: Any, type_tag: str) -> bytes:
    """Blazen's layout for Python objects with ``__blazen_serialize__``: u32 BE tag length, tag, user
    bytes."""
    body = value.__blazen_serialize__()
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"__blazen_serialize__ returned {type(body).__name__}, expected bytes")
    tag = type_tag.encode("utf-8")
    return struct.pack(">I", len(tag)) + tag + bytes(body)


class SessionRefStore:
    def __init__(
        self,
        *,
        max_count: int = 10_000,
        max_bytes: int = 256 * 1024 * 1024,
        parent_ttl_secs: float | None = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.parent_ttl_secs = parent_ttl_secs
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._by_run: dict[int, list[str]] = {}
        self._expiry: list[tuple[float, str]] = []
        self._bytes = 0
        self._lock = threading.Lock()

    # -- bookkeeping ---------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def _drop(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry

    def sweep(self) -> int:
        """Drop expired ``UntilParentFinish`` entries; returns how many were dropped."""
        now = self._clock()
        dropped = 0
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                _, key = heapq.heappop(self._expiry)
                entry = self._entries.get(key)
                if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
                    self._drop(key)
                    dropped += 1
        return dropped

    # -- the operations ------------------------------------------------------------------------------------

    def insert(
        self,
        value: Any,
        *,
        run_id: int | None = None,
        type_tag: str | None = None,
        lifetime: RefLifetime | str = RefLifetime.UntilContextDrop,
        serialize: Callable[[Any], bytes] | None = None,
    ) -> SessionRefHandle:
        life = RefLifetime.parse(lifetime)
        tag = type_tag or type_tag_of(value)
        try:
            if serialize is not None:
                payload: bytes | None = bytes(serialize(value))
            elif hasattr(value, "__blazen_serialize__"):
                payload = blazen_object_payload(value, tag)
            elif isinstance(value, bytes | bytearray | memoryview):
                payload = bytes(value)
            else:
                payload = None  # live-only: usable in-process, not derefable
        except BaseException as exc:  # user code: its SystemExit must not stop the event loop either
            reason = exception_text(exc)
            raise SessionRefError(f"serialization of session ref ({tag}) failed: {reason}") from exc
        size = len(payload) if payload is not None else 0
        if self._expiry and self._expiry[0][0] <= self._clock():
            self.sweep()
        key = str(_uuid.uuid4())
        now_ms = int(time.time() * 1000)
        expires = None
        if life is RefLifetime.UntilParentFinish and self.parent_ttl_secs:
            expires = self._clock() + self.parent_ttl_secs
        with self._lock:
            run_keys = None
            if run_id is not None:
                run_keys = self._by_run.get(run_id)
                if run_keys is None:
                    raise SessionRefError(
                        f"session ref insert refused: run {run_id} has ended (its step outlived it)"
                    )
            if len(self._entries) >= self.max_count:
                raise SessionRefLimitError(
                    f"session ref limit reached: {len(self._entries)} refs held, the cap is {self.max_count} "
                    "(--ref-max-count)"
                )
            if self._bytes + size > self.max_bytes:
                raise SessionRefLimitError(
                    f"session ref byte limit reached: {self._bytes} bytes held + {size} new "
                    f"> cap {self.max_bytes} (--ref-max-bytes)"
                )
            self._entries[key] = _Entry(
                uuid=key,
                value=value,
                payload=payload,
                type_tag=tag,
                lifetime=life,
                created_at_ms=now_ms,
                expires_at=expires,
                run_id=run_id,
                size=size,
            )
            self._bytes += size
            if run_keys is not None:
                run_keys.append(key)
            if expires is not None:
                heapq.heappush(self._expiry, (expires, key))
        return SessionRefHandle(key, tag, life)

    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self._clock():
            with self._lock:
                self._drop(key)
            return None
        return entry

    def get(self, key: str) -> Any:
        entry = self._live(key)
        if entry is None:
            raise KeyError(key)
        return entry.value

    def payload(self, key: str) -> bytes | None:
        """The serialized bytes, or None when the ref is unknown or live-only."""
        entry = self._live(key)
        return None if entry is None else entry.payload

    def holds(self, key: str) -> bool:
        return self._live(key) is not None

    def release(self, key: str) -> bool:
        """True when an entry was found and dropped, False when there was none (already gone)."""
        entry = self._live(key)
        if entry is None:
            return False
        with self._lock:
            return self._drop(key) is not None

    def open_run(self, run_id: int, ended: Callable[[], bool]) -> None:
        """Let run ``run_id`` insert, unless ``ended()``: checked under the lock ``end_run`` takes, so a
        run ending while its step opens the run never leaves an open run behind."""
        with self._lock:
            if not ended():
                self._by_run.setdefault(run_id, [])

    def end_run(self, run_id: int) -> list[tuple[str, str, int]]:
        """Close the run to inserts and drop its ``UntilContextDrop`` refs; return ``(uuid, type_tag,
        created_at_ms)`` for each of its surviving, derefable refs."""
        with self._lock:
            keys = self._by_run.pop(run_id, None)
            if not keys:
                return []
            survivors = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                if entry.lifetime is RefLifetime.UntilContextDrop:
                    self._drop(key)
                elif entry.payload is not None:
                    survivors.append((key, entry.type_tag, entry.created_at_ms))
            return survivors


_run_ids = itertools.count(1)


def next_run_id() -> int:
    return next(_run_ids)


class RunRefs:
    """``ctx.session_refs``: the store, seen from one sub-workflow run."""

    __slots__ = ("_run_id", "_store")

    def __init__(self, store: SessionRefStore, run_id: int) -> None:
        self._store = store
        self._run_id = run_id

    def insert(
        self,
        value: Any,
        type_tag: str | None = None,
        lifetime: RefLifetime | str = RefLifetime.UntilContextDrop,
        serialize: Callable[[Any], bytes] | None = None,
    ) -> SessionRefHandle:
        return self._store.insert(
            value, run_id=self._run_id, type_tag=type_tag, lifetime=lifetime, serialize=serialize
        )

    def get(self, ref: SessionRefHandle | str) -> Any:
        return self._store.get(str(ref))

    def release(self, ref: SessionRefHandle | str) -> bool:
        return self._store.release(str(ref))

    def __contains__(self, ref: object) -> bool:
        return self._store.holds(str(ref))
