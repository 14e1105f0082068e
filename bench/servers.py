"""The servers under test, each run as ``python -m bench.servers KIND PORT`` in its own process."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any


async def blazen_rust(port: int) -> None:
    import blazen  # needs the LD_PRELOAD shim

    await blazen.BlazenPeerServer("bench-rust").serve(f"127.0.0.1:{port}")


async def bare_grpcio(port: int) -> None:
    """The ceiling for any Python grpcio server: decode the request, answer NOT_FOUND as Blazen does."""
    import grpc
    from blazen_peer.transport.grpc_server import grpc_server_options
    from blazen_peer.wire import SubWorkflowRequest, unwrap

    not_found = grpc.StatusCode.NOT_FOUND

    async def invoke(request: bytes, context: grpc.aio.ServicerContext) -> None:
        req = SubWorkflowRequest.decode(unwrap(request))
        context.set_code(not_found)
        context.set_details(f"unknown step id `{req.step_ids[0]}`")

    server = grpc.aio.server(options=grpc_server_options())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blazen.peer.v1.BlazenPeer",
                {"InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(invoke)},
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def bare_grpcio_sync(port: int) -> None:
    """The same bare handler on grpcio's synchronous (thread-pool) server, for reference."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from blazen_peer.transport.grpc_server import grpc_server_options
    from blazen_peer.wire import SubWorkflowRequest, unwrap

    not_found = grpc.StatusCode.NOT_FOUND

    def invoke(request: bytes, context: grpc.ServicerContext) -> None:
        req = SubWorkflowRequest.decode(unwrap(request))
        context.set_code(not_found)
        context.set_details(f"unknown step id `{req.step_ids[0]}`")

    server = grpc.server(ThreadPoolExecutor(max_workers=8), options=grpc_server_options())
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "blazen.peer.v1.BlazenPeer",
                {"InvokeSubWorkflow": grpc.unary_unary_rpc_method_handler(invoke)},
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    await asyncio.get_running_loop().run_in_executor(None, server.wait_for_termination)


def ours(port: int, *extra: str) -> None:
    """The product as a pod runs it: the ``blazen-peer serve`` CLI (its event loop, logging, signals)."""
    from blazen_peer.cli import main

    main(
        [
            "serve",
            "--entrypoint=bench.steps",
            "--node-id=bench-ours",
            f"--grpc-addr=127.0.0.1:{port}",
            "--admin-addr=off",
            "--insecure",
            "--log-level=WARNING",
            *extra,
        ]
    )


#: the split-run benchmark's peers (bench/split.py) trust their router by this token (loopback only).
SPLIT_TOKEN = "bench-split-router-token"


def _split_token() -> str:
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="bench-split-token-")
    os.write(fd, SPLIT_TOKEN.encode())
    os.close(fd)
    return path


def chain_peer(port: int, steps: str, *extra: str) -> None:
    """A peer serving only ``steps`` of bench/steps.py (e.g. ``hop1``, ``hop2`` or both: ``hop1,hop2``)
    that runs single steps for the split benchmark's router; ``extra``: more ``serve`` flags."""
    ours(
        port,
        f"--steps={','.join('bench::' + s for s in steps.split(','))}",
        f"--fleet-router-token-file={_split_token()}",
        *extra,
    )


def pools_router(port: int, *pools: str) -> None:
    """``blazen-peer route`` over ``NAME=H:P`` pools, sending the split benchmark's router token."""
    from blazen_peer.cli import main

    main(
        [
            "route",
            "--node-id=bench-router",
            f"--grpc-addr=127.0.0.1:{port}",
            *(f"--pool={p}" for p in pools),
            f"--fleet-router-token-file={_split_token()}",
            "--admin-addr=off",
            "--insecure",
            "--log-level=WARNING",
        ]
    )


def router(port: int, upstream: int, data_plane: str = "relay") -> None:
    """``blazen-peer route`` with one pool of one replica: the peer of (d) on ``upstream``; ``data_plane``:
    the relay (Rust) or grpcio (the pure-Python path)."""
    from blazen_peer.cli import main

    main(
        [
            "route",
            "--node-id=bench-router",
            f"--grpc-addr=127.0.0.1:{port}",
            f"--pool=bench=127.0.0.1:{upstream}",
            "--admin-addr=off",
            "--insecure",
            "--log-level=WARNING",
            f"--data-plane={data_plane}",
        ]
    )


def router_grpcio(port: int, upstream: int) -> None:
    router(port, upstream, "grpcio")


def per_method(forward: Callable[[str], Any]) -> Any:
    """The forwarder's generic handler: each method's forwarding handler built once, at its first call."""
    import grpc

    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class PerMethod(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method = handler_call_details.method
            found = handlers.get(method)
            if found is None:
                found = handlers[method] = forward(method)
            return found

    return PerMethod()


def aio_forwarder(port: int, upstream: int) -> None:
    """Experiment: the same bare hop on grpc.aio (uvloop, as the router runs): a generic handler awaiting
    one pooled ``grpc.aio`` channel, no admission, no routing - the floor of the router's present hop."""
    import grpc
    import uvloop
    from blazen_peer.transport.grpc_server import grpc_server_options
    from blazen_peer.wire.protocol import NODE_ID_METADATA

    async def serve() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{upstream}")

        def forward(method: str) -> grpc.RpcMethodHandler:
            call = channel.unary_unary(method)

            async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes | None:
                md = [(k, v) for k, v in context.invocation_metadata() or () if k == NODE_ID_METADATA]
                try:
                    return await call(request, timeout=context.time_remaining(), metadata=md)
                except grpc.aio.AioRpcError as exc:
                    context.set_code(exc.code())
                    context.set_details(exc.details())
                    return None

            return grpc.unary_unary_rpc_method_handler(handler)

        server = grpc.aio.server(options=grpc_server_options())
        server.add_generic_rpc_handlers((per_method(forward),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


async def ours_sync(port: int) -> None:
    """Experimental: our engine behind grpcio's synchronous server (bench/grpc_sync.py)."""
    import threading

    from blazen_peer.engine import PeerService, default_registry, load_entrypoint
    from blazen_peer.engine.executor import StepExecutor

    from .grpc_sync import create_sync_grpc_server

    load_entrypoint("bench.steps")
    service = PeerService("bench-ours-sync", default_registry, executor=StepExecutor(4))
    loop = asyncio.get_running_loop()
    server = create_sync_grpc_server(service, loop)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = asyncio.Event()
    threading.Thread(
        target=lambda: (server.wait_for_termination(), loop.call_soon_threadsafe(done.set))
    ).start()
    await done.wait()


KINDS: dict[str, Callable[..., object]] = {
    "blazen-rust": blazen_rust,
    "bare-grpcio": bare_grpcio,
    "bare-grpcio-sync": bare_grpcio_sync,
    "ours": ours,
    "ours-sync": ours_sync,
    "router": router,
    "router-grpcio": router_grpcio,
    "aio-forwarder": aio_forwarder,
}
#: kinds taking string arguments after the port (bench/split.py)
STR_KINDS: dict[str, Callable[..., object]] = {"chain-peer": chain_peer, "pools-router": pools_router}

if __name__ == "__main__":
    if sys.argv[1] in STR_KINDS:
        STR_KINDS[sys.argv[1]](int(sys.argv[2]), *sys.argv[3:])
        sys.exit(0)
    started = KINDS[sys.argv[1]](*(int(a) for a in sys.argv[2:]))
    if asyncio.iscoroutine(started):  # the others run their own loop
        asyncio.run(started)
