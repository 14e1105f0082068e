"""CORS for the HTTP/JSON shim (``--cors-allow-origin``, repeatable).

Browsers running Blazen's WASM ``HttpPeerClient`` send a preflight ``OPTIONS`` (their requests carry
``Content-Type: application/json`` and ``X-Blazen-Peer-Node-Id``). For an allowed origin the preflight
is answered here, before authentication (preflights carry no credentials), with the origin,
``Access-Control-Allow-Headers: Content-Type, X-Blazen-Peer-Node-Id, Authorization``,
``Access-Control-Allow-Methods: POST, OPTIONS``, ``Access-Control-Max-Age`` and ``Vary: Origin``;
actual responses to an allowed origin (errors included, so the page can read ``{"error": ...}``)
carry ``Access-Control-Allow-Origin`` and ``Vary: Origin``. Other origins get no CORS header (a
preflight from them is answered 403). ``*`` allows any origin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict, istr

from ..wire.protocol import AUTHORIZATION_HEADER, NODE_ID_HEADER

__all__ = [
    "DEFAULT_ALLOW_HEADERS",
    "DEFAULT_ALLOW_METHODS",
    "CorsPolicy",
    "make_cors_middleware",
    "normalize_origin",
]

log = logging.getLogger("blazen_peer.security.cors")

DEFAULT_ALLOW_HEADERS = ("Content-Type", NODE_ID_HEADER, AUTHORIZATION_HEADER)
DEFAULT_ALLOW_METHODS = ("POST", "OPTIONS")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str:
    """``scheme://host[:port]`` in the form browsers send it (lower case, no default port, no path);
    raises ``ValueError`` for anything else. ``*`` is kept."""
    value = value.strip()
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid CORS origin {value!r}: expected scheme://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"invalid CORS origin {value!r}: an origin has no path, query or credentials")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS[parts.scheme] else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}"


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    origins: frozenset[str]
    any_origin: bool = False
    allow_headers: tuple[str, ...] = DEFAULT_ALLOW_HEADERS
    allow_methods: tuple[str, ...] = DEFAULT_ALLOW_METHODS
    max_age: int = 600
    allow_credentials: bool = False

    @classmethod
    def from_values(cls, values: Iterable[str], **kwargs: Any) -> CorsPolicy:
        """From repeated flags and/or comma-separated env values."""
        origins: set[str] = set()
        for v in values:
            for item in v.split(","):
                if item.strip():
                    origins.add(normalize_origin(item))
        any_origin = "*" in origins
        origins.discard("*")
        return cls(frozenset(origins), any_origin, **kwargs)

    def allows(self, origin: str) -> bool:
        if self.any_origin:
            return True
        try:
            return normalize_origin(origin) in self.origins
        except ValueError:
            return False

    def allow_origin_value(self, origin: str) -> str:
        return "*" if self.any_origin and not self.allow_credentials else origin


def _add_vary(headers: CIMultiDict[str] | Any, value: str = "Origin") -> None:
    existing = headers.get("Vary")
    if not existing:
        headers["Vary"] = value
    elif value.lower() not in [v.strip().lower() for v in existing.split(",")]:
        headers["Vary"] = f"{existing}, {value}"


def make_cors_middleware(policy: CorsPolicy | Iterable[str], **kwargs: Any) -> Callable[..., Any]:
    """aiohttp middleware; put it first (outermost) in the shim's middleware list."""
    if not isinstance(policy, CorsPolicy):
        policy = CorsPolicy.from_values(policy, **kwargs)
    allow_headers = ", ".join(policy.allow_headers)
    allow_methods = ", ".join(policy.allow_methods)
    vary = not (policy.any_origin and not policy.allow_credentials)
    acao = istr("Access-Control-Allow-Origin")

    def decorate(headers: Any, origin: str) -> None:
        headers[acao] = policy.allow_origin_value(origin)
        if policy.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        if vary:
            _add_vary(headers)

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        allowed = policy.allows(origin)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                log.info("refused CORS preflight from origin %r", origin)
                return web.json_response(
                    {"error": "origin not allowed"}, status=403, headers={"Vary": "Origin"}
                )
            resp = web.Response(status=204)
            decorate(resp.headers, origin)
            resp.headers["Access-Control-Allow-Headers"] = allow_headers
            resp.headers["Access-Control-Allow-Methods"] = allow_methods
            resp.headers["Access-Control-Max-Age"] = str(policy.max_age)
            return resp
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            if allowed:
                decorate(exc.headers, origin)
            elif vary:
                _add_vary(exc.headers)
            raise
        if not resp.prepared:
            if allowed:
                decorate(resp.headers, origin)
            elif vary:
                _add_vary(resp.headers)
        return resp

    return cors_middleware
