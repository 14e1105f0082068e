"""Blazen peer runtime: a wire-compatible ``blazen.peer.v1.BlazenPeer`` server (gRPC and HTTP/JSON) in Python.

User code registers steps::

    from blazen_peer import step, Workflow

    @step("my_app::analyze", accepts=["blazen::StartEvent"])
    async def analyze(event: dict, ctx):
        return {"type": "blazen::StopEvent", "result": {"n": len(event["document"])}}
"""

from .config import PeerConfig
from .engine.context import Context
from .engine.refs import RefLifetime, SessionRefError, SessionRefHandle, SessionRefLimitError
from .engine.registry import START_EVENT, STOP_EVENT, StepRegistry, Workflow, default_registry, step
from .hooks import ServerHooks
from .server import BlazenPeerServer, ServerConsumedError
from .wire.protocol import ENVELOPE_VERSION

__all__ = [
    "ENVELOPE_VERSION",
    "START_EVENT",
    "STOP_EVENT",
    "BlazenPeerServer",
    "Context",
    "PeerConfig",
    "RefLifetime",
    "ServerConsumedError",
    "ServerHooks",
    "SessionRefError",
    "SessionRefHandle",
    "SessionRefLimitError",
    "StepRegistry",
    "Workflow",
    "default_registry",
    "step",
]
