"""Run the operator in-process with kopf (what `blazen-operator run` calls)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import kopf


@dataclass(frozen=True)
class Options:
    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    liveness_port: int = 8081
    metrics_port: int = 8000
    resync_seconds: float = 60.0
    watch_inactivity_seconds: float = 70.0
    verbose: bool = False


def run(options: Options) -> None:
    os.environ["BLAZEN_OPERATOR_RESYNC_SECONDS"] = str(options.resync_seconds)
    os.environ["BLAZEN_OPERATOR_METRICS_PORT"] = str(options.metrics_port)
    os.environ["BLAZEN_OPERATOR_WATCH_INACTIVITY_SECONDS"] = str(options.watch_inactivity_seconds)
    os.environ["BLAZEN_OPERATOR_NAMESPACES"] = "" if options.all_namespaces else ",".join(options.namespaces)
    kopf.configure(verbose=options.verbose, debug=False)
    logging.getLogger("blazen_operator").setLevel(logging.DEBUG if options.verbose else logging.INFO)

    from . import handlers  # noqa: F401  (registers the handlers)

    liveness = f"http://0.0.0.0:{options.liveness_port}/healthz" if options.liveness_port else None
    kopf.run(
        standalone=True,  # no kopf peering: one replica
        clusterwide=options.all_namespaces,
        namespaces=() if options.all_namespaces else options.namespaces,
        liveness_endpoint=liveness,
    )
