"""The security decisions taken from a ``PeerConfig``: which token source, which TLS material, how TLS callers
are authenticated (``--tls-client-auth``), whether the configuration may serve at all, and who may call the
HTTPS shim. The composition root (``blazen_peer.app``) applies them to the listeners."""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

from ..config import PeerConfig
from ..pki.reload import ReloadingTlsSource, ca_files
from ..pki.tls import system_roots_pem
from ..wire.errors import PeerInsecureConfigError, PeerTlsError
from .auth import TokenSource
from .fleet_router import FleetRouterGuard
from .http_auth import HttpAuth, resolve_http_auth

__all__ = [
    "INSECURE_MESSAGE",
    "TlsClientAuth",
    "check_secure",
    "fleet_router_guard",
    "fleet_router_token",
    "http_auth",
    "load_tls",
    "pool_hop_tls",
    "pool_hop_tokens",
    "tls_client_auth",
    "token_source",
]

#: ``--tls-client-auth`` resolved: "require" (mutual TLS, client certificates chained to --tls-ca) or "none".
TlsClientAuth = Literal["require", "none"]

log = logging.getLogger("blazen_peer.security")

INSECURE_MESSAGE = (
    "refusing to start: neither TLS (--tls-cert/--tls-key[/--tls-ca]) nor a bearer token (--token-file, "
    "--token or BLAZEN_PEER_TOKEN) is configured; pass --insecure (BLAZEN_PEER_INSECURE=1) to serve "
    "without either"
)


def token_source(cfg: PeerConfig) -> TokenSource | None:
    """``--token-file`` wins over ``--token`` / ``BLAZEN_PEER_TOKEN``; None when neither is set."""
    if cfg.token_file:
        return TokenSource(token_file=cfg.token_file)
    if cfg.token and cfg.token.strip():
        return TokenSource(token=cfg.token)
    return None


def tls_client_auth(cfg: PeerConfig, tokens: TokenSource | None) -> TlsClientAuth | None:
    """How the TLS listeners authenticate callers (``--tls-client-auth``); None without TLS.

    ``require``: gRPC asks for a client certificate chained to ``--tls-ca`` (mutual TLS). ``none``: no
    listener asks for one, so the bearer token is the only thing that tells callers apart and is required:
    without it the peer refuses to start rather than serve anyone who can open a TLS connection. A CA
    bundle is never replaced by the system roots for *callers*: any holder of any publicly issued
    certificate would pass. ``auto``: ``require`` with ``--tls-ca``, else ``none``. Decided before the TLS
    files are awaited, so a configuration that can never serve fails at once."""
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    mode = cfg.tls_client_auth
    if mode == "auto":
        mode = "require" if cfg.tls_ca else "none"
    if mode == "require":
        if not cfg.tls_ca:
            raise PeerInsecureConfigError(
                "--tls-client-auth require needs the CA bundle client certificates must chain to (--tls-ca)"
            )
        return "require"
    if tokens is None:
        why = "--tls-client-auth none" if cfg.tls_client_auth == "none" else "no --tls-ca"
        raise PeerInsecureConfigError(
            f"refusing to start: TLS without client certificates ({why}) leaves the bearer token as the only "
            "authentication, and none is configured: give --token-file (or --token / BLAZEN_PEER_TOKEN), or "
            "--tls-ca with --tls-client-auth require for mutual TLS"
        )
    return "none"


def load_tls(cfg: PeerConfig, client_auth: TlsClientAuth | None) -> ReloadingTlsSource | None:
    """The TLS material of ``--tls-cert/--tls-key[/--tls-ca]``, None without TLS.

    Waits up to ``--tls-wait-secs`` while some files are still absent: a pod can start before cert-manager
    has filled its Secret (the operator creates the Secret up front so it carries an owner reference), and
    exiting then would only buy a container restart. Files that exist but are invalid fail at once. This
    runs before any listener is up, so blocking the loop here costs nothing. With ``client_auth`` "none"
    the CA file only says whom outbound hops trust, and an absent or empty one (an issuer that writes no
    ``ca.crt``, e.g. ACME) means the system roots: it is neither awaited nor required."""
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise PeerTlsError("--tls-cert and --tls-key go together")
    if cfg.tls_ca and not cfg.tls_cert:
        raise PeerTlsError("--tls-ca needs --tls-cert and --tls-key")
    if not cfg.tls_cert or not cfg.tls_key:
        return None
    ca_optional = client_auth == "none"
    tls = _wait_for_tls(cfg, cfg.tls_cert, cfg.tls_key, cfg.tls_ca or None, "server", ca_optional)
    if tls.material.ca_pem is None:
        system_roots_pem()  # no trust store to verify siblings and pools against fails here, not per call
    return tls


def pool_hop_tls(cfg: PeerConfig) -> ReloadingTlsSource | None:
    """A router's client identity and trust for the hop to its pools when any ``--pool-tls-*`` is given,
    each defaulting to the router's own ``--tls-*``; None without them (the hop reuses the router's own
    TLS, as session-ref forwarding does)."""
    if not (cfg.pool_tls_cert or cfg.pool_tls_key or cfg.pool_tls_ca):
        return None
    if bool(cfg.pool_tls_cert) != bool(cfg.pool_tls_key):
        raise PeerTlsError("--pool-tls-cert and --pool-tls-key go together")
    cert, key = cfg.pool_tls_cert or cfg.tls_cert, cfg.pool_tls_key or cfg.tls_key
    if not cert or not key:
        raise PeerTlsError(
            "--pool-tls-ca needs a client certificate: --pool-tls-cert/--pool-tls-key or --tls-cert/--tls-key"
        )
    return _wait_for_tls(cfg, cert, key, cfg.pool_tls_ca or cfg.tls_ca or None, "client", False)


def pool_hop_tokens(cfg: PeerConfig) -> TokenSource | None:
    """The token a router sends its pools when ``--pool-token-file`` is given (re-read when it changes);
    None: it sends its own."""
    return TokenSource(token_file=cfg.pool_token_file) if cfg.pool_token_file else None


def fleet_router_token(cfg: PeerConfig) -> TokenSource | None:
    """The fleet router's own token (``--fleet-router-token-file``): a peer checks it, a router sends it."""
    return TokenSource(token_file=cfg.fleet_router_token_file) if cfg.fleet_router_token_file else None


def fleet_router_guard(
    cfg: PeerConfig, client_auth: TlsClientAuth | None, router_token: TokenSource | None
) -> FleetRouterGuard:
    """Who may call this peer's ``RunStep`` / ``EndRun``: nobody unless ``--fleet-router-*`` says. A
    certificate identity needs verified client certificates (``--tls-client-auth require``)."""
    return FleetRouterGuard(cfg.fleet_router_identity, router_token, mtls=client_auth == "require")


def _wait_for_tls(
    cfg: PeerConfig,
    cert: str,
    key: str,
    ca: str | None,
    role: Literal["server", "client"],
    ca_optional: bool,
) -> ReloadingTlsSource:
    deadline = time.monotonic() + cfg.tls_wait_secs
    next_note = 0.0
    awaited = (cert, key) if ca_optional else (cert, key, *ca_files(ca))
    while True:
        try:
            return ReloadingTlsSource(cert, key, ca, role=role, ca_optional=ca_optional)
        except PeerTlsError:
            # Empty counts as not there yet: the kubelet projects a kubernetes.io/tls Secret whose keys
            # cert-manager has not filled with empty files.
            missing = [p for p in awaited if p and (not os.path.exists(p) or os.path.getsize(p) == 0)]
            now = time.monotonic()
            if not missing or now >= deadline:
                raise
            if now >= next_note:
                log.info("waiting up to %.0f s for TLS files: %s", deadline - now, ", ".join(missing))
                next_note = now + 10
            time.sleep(0.5)


def check_secure(cfg: PeerConfig, tls: ReloadingTlsSource | None, tokens: TokenSource | None) -> None:
    """Secure by default: neither TLS nor a token and no ``--insecure`` raises ``PeerInsecureConfigError``;
    the weaker configurations that are allowed say so in the log."""
    if tls is None and tokens is None:
        if not cfg.insecure:
            raise PeerInsecureConfigError(INSECURE_MESSAGE)
        log.warning("serving without TLS and without a token (--insecure)")


def http_auth(
    cfg: PeerConfig,
    tls: ReloadingTlsSource | None,
    tokens: TokenSource | None,
    client_auth: TlsClientAuth | None,
) -> HttpAuth | None:
    """Who may call the HTTP shim (``--http-auth``, ``security.http_auth``); None when it does not listen.
    Client certificates count on the shim only where the TLS listeners verify them (``client_auth``
    "require")."""
    if not cfg.http_addr:
        return None
    return resolve_http_auth(
        cfg.http_auth, tls=tls is not None, ca=client_auth == "require", token=tokens is not None
    )
