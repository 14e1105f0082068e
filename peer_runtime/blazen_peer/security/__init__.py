"""The security decisions of the peer runtime, one job per module (see docs/security.md): ``policy`` (what a
``PeerConfig`` asks for: token, TLS, secure by default, who may call the HTTPS shim), ``http_auth`` (the
``--http-auth`` rule), ``auth`` (the bearer token) and ``cors``; the TLS files themselves (PEM validation, TLS
suites, certificates that follow a Secret volume) live in ``blazen_peer.pki``, which the client shares. The
composition root (``blazen_peer.app``) applies them; the admission (``blazen_peer.admission``) checks the
token per call.

``load_server_tls``, ``load_client_tls``, ``TlsMaterial``, ``ReloadingTlsSource`` and ``TokenSource`` are also
reachable here, loaded on first use so that importing the package stays free of cryptography.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "TlsMaterial": "blazen_peer.pki.tls",
    "load_client_tls": "blazen_peer.pki.tls",
    "load_server_tls": "blazen_peer.pki.tls",
    "ReloadingTlsSource": "blazen_peer.pki.reload",
    "TokenSource": "blazen_peer.security.auth",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blazen_peer.security' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
