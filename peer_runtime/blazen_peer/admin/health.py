"""The standard gRPC health service (``grpc.health.v1.Health``), following a ``Readiness``.

``AioReadinessHealthServicer`` is for grpc.aio servers: ``Check`` answers from the readiness at call
time, ``Watch`` streams every change. It knows the overall service ``""`` and ``blazen.peer.v1.BlazenPeer``;
other names are NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..wire.protocol import SERVICE
from .readiness import Readiness

__all__ = [
    "SERVICES",
    "AioReadinessHealthServicer",
    "add_health_servicer",
]

SERVICES = ("", SERVICE)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class AioReadinessHealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, readiness: Readiness, services: Iterable[str] = SERVICES) -> None:
        self._readiness = readiness
        self._services = frozenset(services)
        self._watchers: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        readiness.add_listener(self._changed)

    def _status(self) -> int:
        return _SERVING if self._readiness.ready else _NOT_SERVING

    def _changed(self, ready: bool) -> None:
        for loop, event in list(self._watchers):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    async def Check(self, request, context):
        if request.service not in self._services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status())

    async def Watch(self, request, context) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if request.service not in self._services:
            yield health_pb2.HealthCheckResponse(status=_UNKNOWN)
            return
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        self._watchers.add(entry)
        try:
            last = None
            while True:
                status = self._status()
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
                await event.wait()
                event.clear()
        finally:
            self._watchers.discard(entry)


def add_health_servicer(server: grpc.aio.Server, servicer: health_pb2_grpc.HealthServicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
