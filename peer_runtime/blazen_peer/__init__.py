"""Blazen peer runtime: a wire-compatible ``blazen.peer.v1.BlazenPeer`` server (gRPC and HTTP/JSON) in Python.

User code registers steps::

    from blazen_peer import step, Workflow

    @step("my_app::analyze", accepts=["blazen::StartEvent"])
    async def analyze(event: dict, ctx):
        return {"type": "blazen::StopEvent", "result": {"n": len(event["document"])}}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PeerConfig
    from .engine.context import Context
    from .engine.refs import RefLifetime, SessionRefError, SessionRefHandle, SessionRefLimitError
    from .engine.registry import START_EVENT, STOP_EVENT, StepRegistry, Workflow, default_registry, step
    from .hooks import ServerHooks
    from .server import BlazenPeerServer, ServerConsumedError
    from .wire.protocol import ENVELOPE_VERSION

# Loaded on first use, so ``blazen-peer serve`` can set grpcio's environment (cli.py) before grpcio is
# imported: grpcio reads GRPC_SSL_CIPHER_SUITES and GRPC_VERBOSITY once, at import.
_LAZY = {
    "PeerConfig": "config",
    "Context": "engine.context",
    "RefLifetime": "engine.refs",
    "SessionRefError": "engine.refs",
    "SessionRefHandle": "engine.refs",
    "SessionRefLimitError": "engine.refs",
    "START_EVENT": "engine.registry",
    "STOP_EVENT": "engine.registry",
    "StepRegistry": "engine.registry",
    "Workflow": "engine.registry",
    "default_registry": "engine.registry",
    "step": "engine.registry",
    "BlazenPeerServer": "server",
    "ServerConsumedError": "server",
    "ServerHooks": "hooks",
    "ENVELOPE_VERSION": "wire.protocol",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blazen_peer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
