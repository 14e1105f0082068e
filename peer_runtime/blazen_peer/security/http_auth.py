"""Who may call the HTTP/JSON shim (``--http-auth``): one decision for that listener, made once at start.

Secure by default per listener, not per process: the shim must not be the anonymous way in to a peer whose
gRPC listener requires mTLS. ``auto`` picks the bearer token when one is configured, else a verified client
certificate when TLS has a CA, and refuses to start in the one case where neither exists on a TLS peer
(the shim would otherwise serve anyone over HTTPS). Without TLS and without a token the process only starts
with ``--insecure``, and then the shim is as open as every other listener.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..pki.reload import ClientAuth
from ..wire.errors import PeerInsecureConfigError

__all__ = ["HttpAuth", "resolve_http_auth"]

log = logging.getLogger("blazen_peer.security")

_CHOICES = (
    "choose --http-auth token (with --token-file), client-cert (with --tls-ca) or, to serve anyone, "
    "unauthenticated"
)


@dataclass(frozen=True, slots=True)
class HttpAuth:
    """``mode``: what the shim checks; ``client_auth``: what its ``SSLContext`` asks of a client;
    ``check_token``: whether the per-call admission checks the bearer token."""

    mode: str
    client_auth: ClientAuth
    check_token: bool


def resolve_http_auth(mode: str, *, tls: bool, ca: bool, token: bool) -> HttpAuth:
    """The shim's authentication for ``--http-auth MODE`` given what is configured; raises
    ``PeerInsecureConfigError`` (naming the flag) for a choice the configuration cannot honour."""
    if mode == "auto":
        if token:
            mode = "token"
        elif tls and ca:
            mode = "client-cert"
        elif tls:
            raise PeerInsecureConfigError(
                "refusing to start the HTTP shim (--http-addr): TLS without --tls-ca and no bearer token "
                f"would let anyone call it; {_CHOICES}"
            )
        else:
            # No TLS, no token: check_secure() has already insisted on --insecure for the whole process.
            return HttpAuth("unauthenticated", "none", False)
    if mode == "client-cert":
        if not (tls and ca):
            raise PeerInsecureConfigError(
                "--http-auth client-cert needs TLS that verifies client certificates (--tls-cert, --tls-key "
                "and --tls-ca, --tls-client-auth require or auto)"
            )
        # A token, when configured, is checked too: the same rule as the gRPC listener.
        return HttpAuth(mode, "required", token)
    if mode == "token":
        if not token:
            raise PeerInsecureConfigError(
                "--http-auth token needs a bearer token (--token-file, --token or BLAZEN_PEER_TOKEN)"
            )
        # With a CA a certificate is still asked for, and verified when one is sent (as before --http-auth).
        return HttpAuth(mode, "optional" if ca else "none", True)
    if mode == "unauthenticated":
        log.warning(
            "the HTTP shim serves ANYONE: --http-auth unauthenticated (no client certificate, no token)"
        )
        return HttpAuth(mode, "none", False)
    raise ValueError(f"unknown --http-auth mode {mode!r}")
