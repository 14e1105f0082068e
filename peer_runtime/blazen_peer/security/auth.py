"""Bearer-token authentication: the token source and the per-call check. The admission
(``blazen_peer.admission``, gRPC and HTTP) calls ``why_rejected`` on every call.

The token comes from ``--token-file`` (re-read when the file changes, so a rotated Secret takes effect
without a restart) or from ``BLAZEN_PEER_TOKEN``; surrounding whitespace is stripped. Callers send
``authorization: Bearer <token>`` (gRPC metadata or HTTP header), the convention Blazen's control plane
uses; the comparison is constant-time (``hmac.compare_digest``).

After a rotation the previous token is still accepted for ``rotation_grace`` seconds (default 120):
the kubelet updates the Secret in each pod at its own moment (up to about a minute apart), so without
that window siblings would reject each other's forwarded calls in between.

A file rewritten in place is taken only once it has held still for ``settle`` seconds (default 1), so a
read between a truncation and the write that follows never yields a half token.

The per-call cost is one ``time.monotonic()``, a split and one or two ``compare_digest``; the file is
stat()ed at most once per ``recheck_interval``. The token is never logged and never part of a message.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable

from ..wire.errors import PeerAuthConfigError
from ..wire.protocol import AUTHORIZATION_METADATA, TOKEN_ENV

__all__ = [
    "TOKEN_ENV",
    "TokenSource",
]

log = logging.getLogger("blazen_peer.security.auth")

MISSING = "missing bearer token (send 'authorization: Bearer <token>')"
INVALID = "invalid bearer token"


def _file_signature(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:
        return (path, "error", e.errno)
    return (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


class TokenSource:
    """The current bearer token (and, during a rotation, the previous one)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        recheck_interval: float = 1.0,
        rotation_grace: float = 120.0,
        settle: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if (token is None) == (token_file is None):
            raise ValueError("give exactly one of token= or token_file=")
        self._file = os.fspath(token_file) if token_file is not None else None
        self._interval = recheck_interval
        self._grace = rotation_grace
        self._clock = clock
        self._lock = threading.Lock()
        self._next_check = clock() + recheck_interval
        self._sig: tuple | None = None
        self._settle = settle
        #: a changed file seen once: (signature, value, first seen); it becomes the token when it holds still.
        self._pending: tuple[tuple, str, float] | None = None
        self.rotation_count = 0
        if self._file is not None:
            self._sig = _file_signature(self._file)
            value = self._read_file()
            if value is None:
                raise PeerAuthConfigError(f"token file {self._file} is unreadable or empty")
        else:
            value = (token or "").strip()
            if not value:
                raise PeerAuthConfigError(f"{TOKEN_ENV} is empty")
        # (current, previous, previous accepted until)
        self._state: tuple[bytes, bytes | None, float] = (value.encode(), None, 0.0)

    def __repr__(self) -> str:
        return f"TokenSource(file={self._file!r}, rotations={self.rotation_count})"

    # -- reading ---------------------------------------------------------------------------------------
    def _read_file(self) -> str | None:
        assert self._file is not None
        try:
            with open(self._file, encoding="utf-8") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read token file %s: %s", self._file, getattr(e, "strerror", None) or e)
            return None
        return value or None

    def refresh(self) -> bool:
        """Re-read the token file if it changed; True when the token rotated."""
        if self._file is None:
            return False
        with self._lock:
            sig = _file_signature(self._file)
            if sig == self._sig:
                self._pending = None
                return False
            value = self._read_file()
            if value is None:
                # Half-written or removed: keep the current token (failing closed would lock out everyone,
                # failing open is out of the question). Try again at the next check.
                log.warning("token file %s is empty or unreadable; keeping the current token", self._file)
                return False
            # A file rewritten in place (same path and inode: truncate, then write) can be read half-way.
            # Take its new value only once the file has held still, same signature and same text, for
            # ``settle`` seconds, so a read between two writes never becomes the token. A new inode
            # (kubelet's symlink swap, a rename over the file) was complete before it appeared.
            if self._sig is not None and sig[:2] == self._sig[:2]:
                now = self._clock()
                pending = self._pending
                if pending is None or pending[0] != sig or pending[1] != value:
                    self._pending = (sig, value, now)
                    return False
                if now - pending[2] < self._settle:
                    return False
            self._pending = None
            self._sig = sig
            new = value.encode()
            current = self._state[0]
            if hmac.compare_digest(new, current):
                return False
            self._state = (new, current, self._clock() + self._grace)
            self.rotation_count += 1
            log.info("bearer token rotated (previous one accepted for %.0f s)", self._grace)
            return True

    def _maybe_refresh(self) -> None:
        if self._file is not None:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                self.refresh()

    # -- checking --------------------------------------------------------------------------------------
    def check_token(self, presented: str | bytes) -> bool:
        self._maybe_refresh()
        if isinstance(presented, str):
            presented = presented.encode()
        current, previous, until = self._state
        ok = hmac.compare_digest(presented, current)
        if previous is not None and self._clock() < until:
            ok = hmac.compare_digest(presented, previous) or ok
        return ok

    def check_bearer(self, header_value: str | bytes | None) -> bool:
        """True when ``header_value`` is ``Bearer <the current token>`` (scheme case-insensitive)."""
        return self.why_rejected(header_value) is None

    def why_rejected(self, header_value: str | bytes | None) -> str | None:
        """None if accepted, else a caller-safe reason (never containing the token)."""
        if not header_value:
            return MISSING
        if isinstance(header_value, bytes):
            header_value = header_value.decode("latin-1")
        scheme, _, presented = header_value.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return MISSING
        return None if self.check_token(presented.strip()) else INVALID

    # -- outgoing calls and log redaction --------------------------------------------------------------
    def authorization(self) -> str:
        """``Bearer <token>`` for calls this peer makes (session-ref forwarding to siblings)."""
        self._maybe_refresh()
        return "Bearer " + self._state[0].decode()

    def metadata(self) -> list[tuple[str, str]]:
        return [(AUTHORIZATION_METADATA, self.authorization())]

    def secrets(self) -> list[str]:
        """The values a log redaction filter must hide."""
        current, previous, _ = self._state
        return [v.decode() for v in (current, previous) if v]
