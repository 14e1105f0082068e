"""Run the operator in-process with kopf (what `blazen-operator run` calls)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import kopf

from .handlers import Options  # importing handlers registers them with kopf

__all__ = ["Options", "run", "serve"]


def _kopf_kwargs(options: Options) -> dict[str, Any]:
    liveness = f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None
    return {
        "standalone": True,  # no kopf peering: one replica
        "clusterwide": not options.namespaces,
        "namespaces": options.namespaces,
        "liveness_endpoint": liveness,
        "memo": kopf.Memo(options=options),
    }


def _configure(options: Options) -> None:
    kopf.configure(verbose=options.verbose, debug=False)
    logging.getLogger("blazen_operator").setLevel(logging.DEBUG if options.verbose else logging.INFO)


def run(options: Options) -> None:
    """Run until SIGTERM/SIGINT."""
    _configure(options)
    kopf.run(**_kopf_kwargs(options))


def serve(options: Options, stop: threading.Event, liveness_host: str = "0.0.0.0") -> None:
    """Run in the calling thread until ``stop`` is set (an embedding host or a test harness)."""
    _configure(options)
    kwargs = _kopf_kwargs(options)
    if options.liveness_port:
        kwargs["liveness_endpoint"] = f"http://{liveness_host}:{options.liveness_port}/healthz"
    asyncio.run(kopf.operator(stop_flag=stop, **kwargs))
