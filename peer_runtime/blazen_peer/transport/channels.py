"""``ChannelPool``: one long-lived gRPC channel per address, built with the caller's current credentials and
options, replaced as a whole after a credential reload. Session-ref forwarding and the router's hop to its
pools both reuse it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["TARGET_NAME_OPTION", "ChannelPool"]

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


class ChannelPool:
    def __init__(
        self,
        *,
        credentials: Callable[[], grpc.ChannelCredentials | None] | None = None,
        options: Callable[[], list[tuple[str, Any]]] | None = None,
        server_name: Callable[[str], str | None] | None = None,
        grace: float = 30.0,
    ) -> None:
        """``credentials()``/``options()`` are read when a channel opens, so a reload reaches new channels;
        ``None`` credentials mean plaintext. ``server_name(addr)``, when it gives one, is the name that
        address's certificate is checked against (over any in ``options()``). ``grace``: how long calls on
        replaced channels may run on."""
        self._credentials = credentials
        self._options = options
        self._server_name = server_name
        self.grace = grace
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Future[Any]] = set()
        self._draining: set[grpc.aio.Channel] = set()

    @property
    def open_channels(self) -> dict[str, grpc.aio.Channel]:
        """The channels new calls use, by address (a copy)."""
        return dict(self._channels)

    def get(self, addr: str) -> grpc.aio.Channel:
        ch = self._channels.get(addr)
        if ch is None:
            creds = self._credentials() if self._credentials is not None else None
            opts = self._options() if self._options is not None else None
            name = self._server_name(addr) if self._server_name is not None else None
            if name:
                opts = [o for o in opts or () if o[0] != TARGET_NAME_OPTION] + [(TARGET_NAME_OPTION, name)]
            ch = (
                grpc.aio.secure_channel(addr, creds, options=opts)
                if creds is not None
                else grpc.aio.insecure_channel(addr, options=opts)
            )
            self._channels[addr] = ch
        return ch

    def reset(self) -> None:
        """New calls open new channels (after a client certificate reload); the old ones close once their
        calls had ``grace`` seconds. Call on the event loop."""
        old, self._channels = self._channels, {}
        for ch in old.values():
            task = asyncio.ensure_future(ch.close(grace=self.grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def discard(self, addr: str, grace: float) -> None:
        """New calls to ``addr`` open a new channel; the old one closes once its calls have ended (those
        still running after ``grace`` seconds are cancelled). Call on the event loop."""
        ch = self._channels.pop(addr, None)
        if ch is None:
            return
        self._draining.add(ch)
        task = asyncio.ensure_future(ch.close(grace=grace))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(lambda _: self._draining.discard(ch))

    async def close(self) -> None:
        old, self._channels = self._channels, {}
        for ch in [*old.values(), *self._draining]:
            await ch.close()
