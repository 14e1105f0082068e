"""Experimental: the same four methods on grpcio's synchronous (thread-pool) server.

The engine stays on its asyncio loop (a dedicated thread); each call decodes in the gRPC worker thread,
answers status errors there without touching the loop, and hands only real runs to the loop. Used by the
benchmark to compare against grpc.aio; ``BlazenPeerServer`` serves with grpc.aio.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
from blazen_peer.engine.service import PeerService
from blazen_peer.transport.grpc_server import GRPC_CODES, _Abort, _decode, grpc_server_options
from blazen_peer.wire.envelope import wrap
from blazen_peer.wire.errors import PeerStatusError
from blazen_peer.wire.messages import SubWorkflowRequest
from blazen_peer.wire.protocol import METHOD_INVOKE, SERVICE


class SyncInvoke:
    def __init__(self, service: PeerService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes | None:
        try:
            req = _decode(request, SubWorkflowRequest.decode)
            self.service.precheck(req)
            fut = asyncio.run_coroutine_threadsafe(self.service.invoke(req), self.loop)
            resp = fut.result()
        except (PeerStatusError, _Abort) as exc:
            context.set_code(GRPC_CODES[exc.status])
            context.set_details(exc.message)
            return None
        return wrap(resp.encode())


def create_sync_grpc_server(
    service: PeerService, loop: asyncio.AbstractEventLoop, workers: int = 8
) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=grpc_server_options())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {METHOD_INVOKE: grpc.unary_unary_rpc_method_handler(SyncInvoke(service, loop))}
            ),
        )
    )
    return server
