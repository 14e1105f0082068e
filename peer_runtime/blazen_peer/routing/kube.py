"""A small Kubernetes watch client on aiohttp (the runtime keeps no dependency on the ``kubernetes`` package).

``ResourceWatch`` keeps a local copy of the objects a label selector matches, the way an informer does: one
list, then one watch after another from the last resourceVersion seen (``allowWatchBookmarks``, the server
ends each after ``timeoutSeconds``); a 410 Gone or an ERROR event relists; a failure waits (exponential
backoff with jitter) and tries again, keeping the copy it has (fail static). It never polls a list.

What the API server sends is bounded: a list body to ``max_body_bytes``, a watch event line to
``max_line_bytes``, a whole watch to ``timeoutSeconds`` plus a grace (a stream that stalls without closing -
a dropped NAT entry, a hung proxy - is abandoned and reopened). The bearer token is read from its file for
every request (bound service-account tokens rotate); the server's certificate must chain to the CA file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["KubeApi", "KubeError", "ResourceWatch", "WatchGone", "iter_lines"]

log = logging.getLogger("blazen_peer.routing.kube")

#: a list body larger than this is refused (a fleet's BlazenPeers and EndpointSlices are kilobytes)
MAX_BODY_BYTES = 32 * 1024 * 1024
#: one watch event larger than this is refused (an EndpointSlice holds at most 1000 endpoints)
MAX_LINE_BYTES = 4 * 1024 * 1024
#: how long past its ``timeoutSeconds`` a watch may stay open before it counts as stalled
WATCH_GRACE_SECS = 10.0
BACKOFF_FIRST_SECS = 0.5
BACKOFF_MAX_SECS = 30.0


class KubeError(Exception):
    """The API server could not be reached, answered an error, or sent something unusable."""


class WatchGone(KubeError):
    """410 Gone: the resourceVersion to watch from is too old; list again."""


async def iter_lines(stream: aiohttp.StreamReader, max_line_bytes: int) -> AsyncIterator[bytes]:
    """The newline-terminated lines of ``stream``, each at most ``max_line_bytes`` (else ``KubeError``, before
    more than that is buffered); a last line without its newline is dropped (a cut-off event)."""
    buf = bytearray()
    while True:
        chunk = await stream.readany()
        if not chunk:
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if len(buf) + nl - start > max_line_bytes:
                raise KubeError(f"a watch event is larger than {max_line_bytes} bytes")
            buf += chunk[start:nl]
            if buf.strip():
                yield bytes(buf)
            buf.clear()
            start = nl + 1
        buf += chunk[start:]
        if len(buf) > max_line_bytes:
            raise KubeError(f"a watch event is larger than {max_line_bytes} bytes")


class KubeApi:
    """GET requests to one API server as one identity: ``base_url``, a bearer token file (re-read for every
    request), a CA bundle for ``https`` URLs."""

    def __init__(
        self,
        base_url: str,
        *,
        token_file: str | None,
        ca_file: str | None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
        connect_timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self.max_body_bytes = max_body_bytes
        self.max_line_bytes = max_line_bytes
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ssl_key: tuple[str, float] | None = None

    def _headers(self) -> dict[str, str]:
        # identity: the size limits count the bytes the server sends, and a compressed body could expand
        # far beyond them in one chunk
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise KubeError(f"cannot read the token file {self.token_file}: {exc}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not self.base_url.startswith("https:"):
            return False
        if not self.ca_file:
            return ssl.create_default_context()
        try:
            key = (self.ca_file, Path(self.ca_file).stat().st_mtime)
            if self._ssl is None or key != self._ssl_key:  # the CA bundle may be rotated in place
                self._ssl = ssl.create_default_context(cafile=self.ca_file)
                self._ssl_key = key
        except (OSError, ssl.SSLError) as exc:
            raise KubeError(f"cannot load the CA bundle {self.ca_file}: {exc}") from None
        return self._ssl

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return self._session

    @contextlib.asynccontextmanager
    async def _get(
        self, path: str, params: dict[str, str], total: float | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=self.connect_timeout)
        try:
            async with self._client().get(
                self.base_url + path,
                params=params,
                headers=self._headers(),
                ssl=self._ssl_context(),
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                if resp.status == 410:
                    raise WatchGone(f"GET {path}: 410 Gone")
                if resp.status != 200:
                    body = (await resp.content.read(2048)).decode("utf-8", "replace")
                    raise KubeError(f"GET {path}: HTTP {resp.status}: {_status_message(body)}")
                yield resp
        except TimeoutError:  # (an OSError too)
            raise KubeError(f"GET {path}: timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise KubeError(f"GET {path}: {type(exc).__name__}: {exc}") from None

    async def list(self, path: str, label_selector: str) -> tuple[list[dict[str, Any]], str]:
        """The matching objects and the list's resourceVersion."""
        async with self._get(path, {"labelSelector": label_selector}, total=60.0) as resp:
            if resp.content_length is not None and resp.content_length > self.max_body_bytes:
                raise KubeError(f"GET {path}: a list larger than {self.max_body_bytes} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > self.max_body_bytes:
                    raise KubeError(f"GET {path}: a list larger than {self.max_body_bytes} bytes")
        try:
            doc = json.loads(body)
            items = doc.get("items") or []
            rv = doc["metadata"]["resourceVersion"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KubeError(f"GET {path}: not a list: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise KubeError(f"GET {path}: not a list of objects")
        return items, str(rv)

    async def watch(
        self, path: str, label_selector: str, resource_version: str, timeout_secs: int
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """(type, object) per event from ``resource_version`` on, bookmarks included; the server ends it after
        ``timeout_secs``, and it is abandoned (``KubeError``) if still open ``WATCH_GRACE_SECS`` later."""
        params = {
            "labelSelector": label_selector,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_secs),
        }
        async with self._get(path, params, total=timeout_secs + WATCH_GRACE_SECS) as resp:
            try:
                async for line in iter_lines(resp.content, self.max_line_bytes):
                    try:
                        event = json.loads(line)
                        kind, obj = event["type"], event["object"]
                    except (ValueError, KeyError, TypeError) as exc:
                        raise KubeError(f"watch {path}: an event that is not one: {exc}") from None
                    if not isinstance(kind, str) or not isinstance(obj, dict):
                        raise KubeError(f"watch {path}: an event that is not one")
                    yield kind, obj
            except TimeoutError:  # (an OSError too)
                limit = timeout_secs + WATCH_GRACE_SECS
                raise KubeError(f"watch {path}: stalled (still open after {limit:.0f} s)") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise KubeError(f"watch {path}: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _status_message(body: str) -> str:
    """A Status object's message, else the start of the body."""
    try:
        msg = json.loads(body).get("message")
    except (ValueError, AttributeError):
        msg = None
    return str(msg) if msg else body[:200]


def _key(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    return f"{meta.get('namespace', '')}/{meta['name']}"


def _rv(obj: dict[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


@dataclass
class WatchHealth:
    """What ``/v1/info`` and ``/metrics`` show about one watch."""

    #: listed at least once: the copy reflects the API, if possibly late
    synced: bool = False
    #: the last list or watch request succeeded (False while retrying after an error)
    healthy: bool = False
    last_error: str | None = None
    #: wall-clock time of the last successful list or watch event (bookmarks included)
    last_seen_at: float | None = None
    lists: int = 0
    watches: int = 0
    events: int = 0
    errors: int = 0


class ResourceWatch:
    """The objects at ``path`` that match ``label_selector``, kept current; ``on_change()`` after each change
    (on the event loop). ``run()`` until cancelled."""

    def __init__(
        self,
        api: KubeApi,
        path: str,
        label_selector: str,
        on_change: Callable[[], None],
        *,
        watch_secs: int = 60,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.path = path
        self.label_selector = label_selector
        self.on_change = on_change
        self.watch_secs = watch_secs
        self.objects: dict[str, dict[str, Any]] = {}
        self.health = WatchHealth()
        self.synced = asyncio.Event()
        self._rv = ""
        self._rng = rng or random.Random()

    def _seen(self) -> None:
        self.health.healthy = True
        self.health.last_seen_at = time.time()

    async def _relist(self) -> None:
        items, rv = await self.api.list(self.path, self.label_selector)
        objects = {k: o for o in items if (k := _key(o)) is not None}
        self.health.lists += 1
        self._seen()
        self._rv = rv
        changed = objects != self.objects or not self.health.synced
        self.objects = objects
        self.health.synced = True
        self.synced.set()
        if changed:
            self.on_change()

    async def _watch_once(self) -> None:
        self.health.watches += 1
        events = self.api.watch(self.path, self.label_selector, self._rv, self.watch_secs)
        # aclosing: leaving on an ERROR event closes the response now, not when the generator is collected
        async with contextlib.aclosing(events):
            async for kind, obj in events:
                self._seen()
                if kind == "ERROR":
                    # A Status: 410 Gone ("too old resource version", "Expired") or another failure: relist.
                    code = obj.get("code")
                    raise WatchGone(f"watch {self.path}: ERROR {code}: {obj.get('message', '')}")
                rv = _rv(obj)
                if rv is not None:
                    self._rv = rv
                if kind == "BOOKMARK":
                    continue
                key = _key(obj)
                if key is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
                    continue
                self.health.events += 1
                if kind == "DELETED":
                    if self.objects.pop(key, None) is not None:
                        self.on_change()
                else:
                    self.objects[key] = obj
                    self.on_change()

    def _failed(self, exc: BaseException) -> None:
        was = self.health.healthy
        self.health.healthy = False
        self.health.errors += 1
        self.health.last_error = str(exc)
        log_fn = log.warning if was or self.health.errors == 1 else log.info
        log_fn("kubernetes %s: %s (keeping the %d objects known)", self.path, exc, len(self.objects))

    async def run(self) -> None:
        backoff = BACKOFF_FIRST_SECS
        relist = True
        while True:
            try:
                if relist:
                    await self._relist()
                    relist = False
                started = time.monotonic()
                await self._watch_once()
                if time.monotonic() - started >= 1.0:
                    backoff = BACKOFF_FIRST_SECS  # ran its course: go on from its version at once
                    continue
                # ended at once: a server (or proxy) that closes every watch must not make us spin
            except WatchGone as exc:
                # What the API asks for is a relist, at once; the backoff below only paces a loop of them.
                log.info("kubernetes %s: %s; listing again", self.path, exc)
                relist = True
            except KubeError as exc:
                self._failed(exc)
            except Exception as exc:  # a bug here must not end discovery: the router keeps its endpoints
                log.exception("kubernetes %s: unexpected failure", self.path)
                self._failed(exc)
                relist = True
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, BACKOFF_MAX_SECS)
