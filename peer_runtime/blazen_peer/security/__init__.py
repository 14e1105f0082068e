"""The security decisions of the peer runtime, one job per module (see docs/security.md): ``policy`` (what a
``PeerConfig`` asks for: token, TLS, secure by default, who may call the HTTPS shim), ``http_auth`` (the
``--http-auth`` rule), ``tls`` (PEM validation), ``tls_policy`` (the TLS suites both listeners accept),
``reload`` (certificates that follow a Secret volume), ``auth`` (the bearer token) and ``cors``. The
composition root (``blazen_peer.app``) applies them; the admission (``blazen_peer.admission``) checks the
token per call.

``load_server_tls``, ``load_client_tls``, ``TlsMaterial``, ``ReloadingTlsSource`` and ``TokenSource`` are also
reachable here, loaded on first use so that importing the package stays free of cryptography.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "TlsMaterial": "tls",
    "load_client_tls": "tls",
    "load_server_tls": "tls",
    "ReloadingTlsSource": "reload",
    "TokenSource": "auth",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blazen_peer.security' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
