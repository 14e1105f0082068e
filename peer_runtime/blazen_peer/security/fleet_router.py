"""Who may call a peer's ``RunStep`` / ``EndRun`` (``blazen.fleet.v1``): only the fleet's router.

These methods run any served step on any event and state the caller chooses, and end runs: an ordinary
caller (a client certificate of the same CA, the shared bearer token) must not reach them, so they are
refused (PERMISSION_DENIED) unless the peer is told who its router is, after the admission (token, drain)
has let the call in:

* ``--fleet-router-identity NAME[,NAME...]``: the caller's verified client certificate (mTLS, so
  ``--tls-ca`` is required) must carry one of these names as a subject alternative name (DNS or URI), the
  name of the router's own certificate (the operator's ``<fleet>-router-tls``);
* ``--fleet-router-token-file PATH``: the call must carry this second token, ``Bearer <token>`` in
  ``x-blazen-fleet-router-token`` (deployments without mTLS; the router sends it from the same flag).

Both given: both are required. The check reads the TLS peer's names grpc already verified (no parsing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..wire.errors import PeerAuthConfigError
from ..wire.protocol import FLEET_ROUTER_TOKEN_METADATA
from .auth import TokenSource

__all__ = ["NOT_CONFIGURED", "FleetRouterGuard"]

NOT_CONFIGURED = (
    "blazen.fleet.v1 step calls are disabled on this peer: it trusts no fleet router "
    "(--fleet-router-identity, --fleet-router-token-file)"
)
_SAN = "x509_subject_alternative_name"


class FleetRouterGuard:
    def __init__(
        self, identities: Iterable[str] = (), token: TokenSource | None = None, *, mtls: bool
    ) -> None:
        self.identities = frozenset(i.encode() for i in identities if i)
        if self.identities and not mtls:
            raise PeerAuthConfigError(
                "--fleet-router-identity needs verified client certificates: "
                "--tls-cert, --tls-key and --tls-ca (--tls-client-auth require)"
            )
        self.token = token
        self._names = ", ".join(sorted(i.decode() for i in self.identities))

    @property
    def configured(self) -> bool:
        return bool(self.identities) or self.token is not None

    def why_refused(self, context: Any) -> str | None:
        """None when the caller is the router, else a caller-safe reason (PERMISSION_DENIED)."""
        if not self.configured:
            return NOT_CONFIGURED
        if self.identities:
            auth = context.auth_context() or {}
            if self.identities.isdisjoint(auth.get(_SAN, ())):
                return (
                    f"the caller is not the fleet router: its client certificate does not name {self._names}"
                )
        if self.token is not None:
            presented = None
            for key, value in context.invocation_metadata() or ():
                if key == FLEET_ROUTER_TOKEN_METADATA:
                    presented = value
                    break
            if self.token.why_rejected(presented) is not None:
                return "the caller is not the fleet router: missing or invalid fleet router token"
        return None
