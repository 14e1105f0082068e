"""Session-ref forwarding to sibling replicas (docs/contracts.md, "Session-ref forwarding").

Siblings come from ``--forward-peers`` (a static ``H:P`` list) or ``--forward-dns`` (the A records of a
headless
Service, at this peer's gRPC port), minus this peer itself. A forwarded call carries ``x-blazen-forwarded:
1`` and
the receiving peer never forwards it again. All siblings are asked at once; the first that holds the ref
answers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable

import grpc

from ..wire.envelope import unwrap, wrap
from ..wire.messages import DerefRequest, DerefResponse, ReleaseRequest, ReleaseResponse
from ..wire.protocol import FORWARDED_METADATA, PATH_DEREF, PATH_RELEASE
from .channels import ChannelPool

log = logging.getLogger("blazen_peer.forwarding")

_LOCAL_HOSTS = {"0.0.0.0", "::", "127.0.0.1", "::1", "localhost", ""}


def split_host_port(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid address {addr!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def local_addresses() -> set[str]:
    hosts = set(_LOCAL_HOSTS)
    try:
        name = socket.gethostname()
        hosts.add(name)
        hosts.update(socket.gethostbyname_ex(name)[2])
    except OSError:
        pass
    return hosts


class SiblingForwarder:
    def __init__(
        self,
        *,
        static_peers: Iterable[str] = (),
        dns_name: str | None = None,
        own_ports: Iterable[int] = (),
        dns_port: int = 50051,
        credentials: Callable[[], grpc.ChannelCredentials | None] | None = None,
        metadata: Callable[[], list[tuple[str, str]]] | None = None,
        options: Callable[[], list[tuple[str, object]]] | None = None,
        timeout_secs: float = 10.0,
    ) -> None:
        self.static_peers = [split_host_port(p) for p in static_peers]
        self.dns_name = dns_name
        self.own_ports = set(own_ports)
        self.dns_port = dns_port
        self._metadata = metadata
        self.timeout_secs = timeout_secs
        # A reload lets forwarding calls in flight finish within their own timeout.
        self.channels = ChannelPool(credentials=credentials, options=options, grace=timeout_secs)
        self._local = local_addresses()

    def _is_self(self, host: str, port: int) -> bool:
        return port in self.own_ports and host in self._local

    async def siblings(self) -> list[str]:
        targets: list[tuple[str, int]] = list(self.static_peers)
        if self.dns_name:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    self.dns_name, self.dns_port, family=socket.AF_INET, type=socket.SOCK_STREAM
                )
                targets.extend((str(info[4][0]), self.dns_port) for info in infos)
            except OSError as exc:
                log.warning("cannot resolve %s for session-ref forwarding: %s", self.dns_name, exc)
        seen: list[str] = []
        for host, port in targets:
            if self._is_self(host, port):
                continue
            addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if addr not in seen:
                seen.append(addr)
        return seen

    def reset_channels(self) -> None:
        """New calls open new channels (e.g. with a reloaded client certificate). Call on the event loop."""
        self.channels.reset()

    async def _call(self, addr: str, method: str, payload: bytes) -> bytes | None:
        """``method``: the full gRPC path."""
        md = [(FORWARDED_METADATA, "1")]
        if self._metadata is not None:
            md.extend(self._metadata())
        call = self.channels.get(addr).unary_unary(method)
        try:
            return unwrap(await call(wrap(payload), metadata=md, timeout=self.timeout_secs))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("forwarding %s to %s failed: %s %s", method, addr, exc.code().name, exc.details())
            return None

    async def _first(
        self, method: str, payload: bytes, accept: Callable[[bytes], object | None]
    ) -> object | None:
        siblings = await self.siblings()
        if not siblings:
            return None
        pending = {asyncio.ensure_future(self._call(a, method, payload)) for a in siblings}
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    raw = t.result()
                    if raw is None:
                        continue
                    value = accept(raw)
                    if value is not None:
                        return value
        finally:
            for t in pending:
                t.cancel()
        return None

    async def deref(self, ref_uuid: str) -> bytes | None:
        def accept(raw: bytes) -> bytes | None:
            return DerefResponse.decode(raw).payload

        return await self._first(PATH_DEREF, DerefRequest(ref_uuid).encode(), accept)  # type: ignore[return-value]

    async def release(self, ref_uuid: str) -> bool:
        def accept(raw: bytes) -> bool | None:
            return True if ReleaseResponse.decode(raw).released else None

        return bool(await self._first(PATH_RELEASE, ReleaseRequest(ref_uuid).encode(), accept))

    async def close(self) -> None:
        await self.channels.close()
