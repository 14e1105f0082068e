"""``blazen-peer serve --entrypoint E --node-id ID --grpc-addr H:P [--http-addr H:P] ...``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .admin.logs import configure_json_logging
from .config import ROUTER_FLAGS, add_flags, config_from
from .engine.watchdog import LoopWatchdog
from .event_loop import run_event_loop
from .pki.tls_policy import pin_grpc_environment
from .wire.errors import PeerError

if TYPE_CHECKING:
    from .server import BlazenPeerServer

log = logging.getLogger("blazen_peer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blazen-peer", description="Blazen peer runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the steps registered by an entrypoint module")
    add_flags(serve)
    route = sub.add_parser(
        "route", help="route calls to pools of peers by the steps they serve (no user code)"
    )
    add_flags(route, ROUTER_FLAGS)
    return parser


async def _serve(server: BlazenPeerServer) -> None:
    """Start, then serve until SIGTERM/SIGINT: ``stop()`` drains (not ready, new calls refused, in-flight
    calls finish within ``--shutdown-grace-secs``) and closes the listeners."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    if server.config.loop_stall_secs > 0:
        # Armed once serving: start() may block the loop on purpose while it waits for TLS files.
        watchdog = LoopWatchdog(loop, server.config.loop_stall_secs)
        server.hooks.on_ready.append(lambda s: watchdog.start())
        server.hooks.on_closed.append(lambda s: watchdog.stop())  # it guards the drain too
    await server.serve()


def _fail(message: str, code: int) -> int:
    """One line, argparse's form, for a peer that cannot start (no traceback, no second JSON copy)."""
    print(f"blazen-peer: error: {message}", file=sys.stderr)
    return code


def _drop_working_directory_from_path() -> None:
    """Entrypoints resolve from the installed packages (and PYTHONPATH), never from whatever directory the
    process was started in: ``python -m blazen_peer.cli`` puts it first on ``sys.path``, where a stray
    ``blazen_examples.py`` or ``json.py`` would shadow the real module."""
    cwd = os.getcwd()
    if sys.path and sys.path[0] in ("", ".", cwd):
        del sys.path[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    pin_grpc_environment()
    _drop_working_directory_from_path()
    # grpcio is imported from here on (router, server): after its environment is set.
    from .router import BlazenRouterServer, pool_source
    from .server import BlazenPeerServer

    routing = args.command == "route"
    try:
        config = config_from(args, flags=ROUTER_FLAGS) if routing else config_from(args)
        if routing:
            pool_source(config)
    except ValueError as exc:
        parser.error(str(exc))
    if not routing and not config.entrypoint:
        parser.error("--entrypoint (or BLAZEN_PEER_ENTRYPOINT) is required")
    holder: list[BlazenPeerServer] = []

    def secrets() -> list[str]:
        runtime = holder[0].runtime if holder else None
        return runtime.secrets() if runtime is not None else []

    configure_json_logging(node_id=config.node_id, level=config.log_level, secrets=secrets)
    server: BlazenPeerServer
    if routing:
        server = BlazenRouterServer(config=config)
        if config.fleet is not None:
            log.info("node %s routing to the pools of fleet %s", config.node_id, config.fleet)
        else:
            log.info("node %s routing to pools %s", config.node_id, ", ".join(config.pool))
    else:
        server = BlazenPeerServer(config=config)
    holder.append(server)
    try:
        run_event_loop(_serve(server), config.event_loop)
    except PeerError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(str(exc), 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
