"""In-process cost of the gRPC handler, without the network: ``python -m bench.micro``.

Calls each handler directly with a stub servicer context, so the figures are the Python work per call that our
runtime adds on top of grpcio's own per-call cost (which is what the ghz benchmark measures end to end).
"""

from __future__ import annotations

import asyncio
import time

from blazen_peer.engine import PeerService, default_registry, load_entrypoint
from blazen_peer.transport.grpc_server import BlazenPeerServicer
from blazen_peer.wire import SubWorkflowRequest, unwrap, wrap


class _Context:
    def set_code(self, code: object) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass

    def invocation_metadata(self) -> tuple:
        return ((":authority", "127.0.0.1"), ("user-agent", "tonic/0.14.6"))


async def _bare(request: bytes, context: _Context) -> None:
    req = SubWorkflowRequest.decode(unwrap(request))
    context.set_code(5)
    context.set_details(f"unknown step id `{req.step_ids[0]}`")


async def main(calls: int = 20000) -> None:
    load_entrypoint("bench.steps")
    servicer = BlazenPeerServicer(PeerService("micro", default_registry))
    unknown = wrap(SubWorkflowRequest.new("bench", ["bench::missing"], {"payload": "x" * 64}).encode())
    echo = wrap(SubWorkflowRequest.new("bench", ["bench::echo"], {"payload": "x" * 64}).encode())
    ctx = _Context()
    for name, fn, data in (
        ("(b) bare decode + NOT_FOUND", _bare, unknown),
        ("(c) ours, unknown step", servicer.invoke, unknown),
        ("(d) ours, echo sub-workflow", servicer.invoke, echo),
    ):
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                await fn(data, ctx)
            best = min(best, (time.perf_counter() - t0) / calls)
        print(f"{name:32} {best * 1e6:6.1f} us/call (best of 5 x {calls})")


if __name__ == "__main__":
    asyncio.run(main())
