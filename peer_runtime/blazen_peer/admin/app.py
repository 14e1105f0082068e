"""The admin aiohttp app: ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/info`` (docs/contracts.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .metrics import PeerMetrics
from .readiness import Readiness

__all__ = ["make_admin_app"]


def make_admin_app(
    *,
    readiness: Readiness,
    metrics: PeerMetrics,
    info: Callable[[], Mapping[str, Any]],
    liveness: Callable[[], bool] | None = None,
) -> web.Application:
    """``/healthz``: 200 while the process is alive (and ``liveness()``, if given, is true), else 503.
    ``/readyz``: 200 when ``readiness.ready``, else 503 with the reason (starting, draining).
    ``/metrics``: the text exposition of ``metrics.registry``.
    ``/v1/info``: ``info()`` (the server's ``{"node_id", "steps", "envelope_version"}``) with ``ready``
    from ``readiness``."""

    def info_body() -> dict[str, Any]:
        return {**info(), "ready": readiness.ready}

    async def healthz(request: web.Request) -> web.Response:
        alive = liveness() if liveness is not None else True
        return web.json_response({"alive": alive}, status=200 if alive else 503)

    async def readyz(request: web.Request) -> web.Response:
        ok = readiness.ready
        return web.json_response({"ready": ok, "reason": readiness.reason}, status=200 if ok else 503)

    async def metrics_handler(request: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def info_handler(request: web.Request) -> web.Response:
        return web.json_response(info_body())

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/v1/info", info_handler)
    return app
