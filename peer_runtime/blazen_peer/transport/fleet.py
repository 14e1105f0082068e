"""The peer side of ``blazen.fleet.v1.Fleet/Describe`` (wire/fleet.py): served on the authenticated
``--grpc-addr`` only, behind the same admission as the BlazenPeer methods (token, drain), never on the
plaintext listener."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ..wire.envelope import wrap
from ..wire.fleet import Description
from ..wire.protocol import PATH_DESCRIBE

__all__ = ["fleet_methods"]


def fleet_methods(describe: Callable[[], Description]) -> dict[str, grpc.RpcMethodHandler]:
    async def handler(request: bytes, context: Any) -> bytes:
        return wrap(describe().encode())

    return {PATH_DESCRIBE: grpc.unary_unary_rpc_method_handler(handler)}
