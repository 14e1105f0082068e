"""``blazen-peer serve --entrypoint E --node-id ID --grpc-addr H:P [--http-addr H:P] ...``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from .config import add_flags, config_from
from .server import BlazenPeerServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blazen-peer", description="Blazen peer runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the steps registered by an entrypoint module")
    add_flags(serve)
    return parser


async def _serve(server: BlazenPeerServer) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    await server.serve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.entrypoint:
        parser.error("--entrypoint (or BLAZEN_PEER_ENTRYPOINT) is required")
    sys.path.insert(0, ".")  # the console script does not put the working directory on the path
    server = BlazenPeerServer(config=config)
    logging.getLogger("blazen_peer").info(
        "node %s serving steps %s", config.node_id, ", ".join(server.served_step_ids) or "<none>"
    )
    asyncio.run(_serve(server))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
