"""The event loop ``blazen-peer serve`` runs on.

uvloop by default: grpc.aio's per-call work is mostly event-loop callbacks, and under concurrency uvloop
serves about 10% more calls per second than asyncio's default loop on the same grpcio server
(docs/benchmarks.md). ``--event-loop asyncio`` is the escape hatch. ``BlazenPeerServer`` itself runs on
whatever loop its caller provides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T], kind: str = "uvloop") -> T:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
