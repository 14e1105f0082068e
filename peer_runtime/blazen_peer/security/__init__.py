"""Security building blocks of the peer runtime, one job per module (see docs/security.md):

``errors`` (typed errors with their gRPC/HTTP status), ``tls`` (PEM validation), ``reload``
(certificates that follow a Secret volume), ``auth`` (bearer token), ``cors``, ``limits``, ``drain``,
``logging`` (JSON logs, redaction), and ``integration``, the one per-call admission path that uses them on
every listener.

``load_server_tls``, ``load_client_tls``, ``TlsMaterial``, ``PeerError``, ``PeerTlsError``,
``ReloadingTlsSource`` and ``TokenSource`` are also reachable here (loaded lazily). The package imports
nothing at import time: ``BlazenPeerServer.start()`` imports it and calls ``install(server)``
(``integration.py``), which wires these blocks into the server's hooks.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "PeerError": "errors",
    "PeerTlsError": "errors",
    "PeerRejected": "errors",
    "TlsMaterial": "tls",
    "load_client_tls": "tls",
    "load_server_tls": "tls",
    "ReloadingTlsSource": "reload",
    "TokenSource": "auth",
    "PeerInsecureConfigError": "errors",
    "SecurityState": "integration",
    "install": "integration",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:  # lazy: importing the package stays free of cryptography/aiohttp
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blazen_peer.security' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
