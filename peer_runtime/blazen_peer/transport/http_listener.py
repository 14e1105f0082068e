"""The TCP side of the aiohttp listeners (HTTP/JSON shim, admin app): what a slow, idle or numerous client
can hold, and what the log says about it.

* **Header and idle deadline** (``--idle-timeout-secs``): aiohttp closes a connection whose next request
  has not been fully received that long after it connected or after its previous answer (its keep-alive
  timer runs from those moments and is not pushed back by partial data), so a slowloris client trickling a
  header byte at a time is cut off at the deadline. The TLS handshake has the same bound.
* **Connection cap** (``--max-connections``, ``PeerConfig.connection_cap()``): a connection past the cap is
  closed at once, so a flood cannot take the descriptors the other listeners and the step code need.
  Refusals are counted, and logged at most once per ``DROP_LOG_INTERVAL``.
* **Client disconnects cancel the handler** (aiohttp's ``handler_cancellation``): a caller that hung up does
  not keep its sub-workflow running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

__all__ = ["DROP_LOG_INTERVAL", "GuardedSite", "make_runner"]

log = logging.getLogger("blazen_peer.http")

DROP_LOG_INTERVAL = 30.0


def make_runner(app: web.Application, *, idle_timeout: float) -> web.AppRunner:
    return web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout, handler_cancellation=True)


class _Refused(asyncio.Protocol):
    """What a connection past the cap talks to: an immediate close (RST, no TIME_WAIT kept here)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _DropLog:
    """One log line per interval for refused connections, with the count since the last line."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._count = 0
        self._next = 0.0

    def __call__(self, cap: int) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning(
                "%s: %d connection(s) refused at the cap of %d (--max-connections) since the last note",
                self._what,
                self._count,
                cap,
            )
            self._count = 0
            self._next = now + DROP_LOG_INTERVAL


class GuardedSite(web.TCPSite):
    """A ``TCPSite`` whose protocol factory refuses connections past ``max_connections`` and whose TLS
    handshake must finish within ``handshake_timeout``."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str | None,
        port: int,
        *,
        ssl_context: Any = None,
        max_connections: int,
        handshake_timeout: float,
        name: str,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=False)
        self._max = max_connections
        self._handshake_timeout = handshake_timeout
        self._drop_log = _DropLog(name)

    def _factory(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        # Established connections; a TLS connection counts once its handshake is done, which the
        # handshake timeout bounds.
        if len(server._connections) >= self._max:  # aiohttp's registry (``.connections`` copies it)
            self._drop_log(self._max)
            return _Refused()
        return server()

    async def start(self) -> None:
        # TCPSite.start with our protocol factory (aiohttp offers no other seam for it).
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
