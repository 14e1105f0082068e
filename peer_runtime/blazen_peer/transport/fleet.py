"""The peer side of ``blazen.fleet.v1.Fleet`` (wire/fleet.py): served on the authenticated ``--grpc-addr``
only, behind the same admission as the BlazenPeer methods (token, drain; ``RunStep`` also counts toward
``--max-concurrent-workflows``), never on the plaintext listener. ``RunStep`` and ``EndRun`` are further
reserved to the fleet's router: ``guard(context)`` (``security.fleet_router.FleetRouterGuard.why_refused``)
says why a caller is not it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from ..engine.remote import RemoteRuns
from ..wire.envelope import wrap
from ..wire.errors import PeerStatusError, Status
from ..wire.fleet import Description, EndRunRequest, EndRunResponse, RunStepRequest
from ..wire.protocol import MAX_MESSAGE_BYTES, NODE_ID_METADATA, PATH_DESCRIBE, PATH_END_RUN, PATH_RUN_STEP
from .grpc_server import GRPC_CODES, decode_message

__all__ = ["fleet_methods"]

log = logging.getLogger("blazen_peer.fleet")


def _caller(context: Any) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == NODE_ID_METADATA:
            return str(value)
    return None


def fleet_methods(
    describe: Callable[[], Description], runs: RemoteRuns, guard: Callable[[Any], str | None]
) -> dict[str, grpc.RpcMethodHandler]:
    async def describe_handler(request: bytes, context: Any) -> bytes:
        return wrap(describe().encode())

    def fail(context: Any, status: Status, message: str) -> None:
        context.set_code(GRPC_CODES[status])
        context.set_details(message)

    def refused(context: Any, method: str) -> bool:
        reason = guard(context)
        if reason is None:
            return False
        log.info("refused %s: %s", method, reason)
        fail(context, Status.PERMISSION_DENIED, reason)
        return True

    async def run_step(request: bytes, context: Any) -> bytes | None:
        if refused(context, "RunStep"):
            return None
        try:
            req = decode_message(request, RunStepRequest.decode)
            resp = await runs.run_step(req, caller_node_id=_caller(context))
        except PeerStatusError as exc:
            fail(context, exc.status, exc.message)
            return None
        out = resp.encode()
        if len(out) > MAX_MESSAGE_BYTES - 8:
            fail(context, Status.OUT_OF_RANGE, f"step reply of {len(out)} bytes exceeds the message limit")
            return None
        return wrap(out)

    async def end_run(request: bytes, context: Any) -> bytes | None:
        if refused(context, "EndRun"):
            return None
        try:
            req = decode_message(request, EndRunRequest.decode)
        except PeerStatusError as exc:
            fail(context, exc.status, exc.message)
            return None
        return wrap(EndRunResponse(runs.end_run(req.run_id)).encode())

    return {
        PATH_DESCRIBE: grpc.unary_unary_rpc_method_handler(describe_handler),
        PATH_RUN_STEP: grpc.unary_unary_rpc_method_handler(run_step),
        PATH_END_RUN: grpc.unary_unary_rpc_method_handler(end_run),
    }
