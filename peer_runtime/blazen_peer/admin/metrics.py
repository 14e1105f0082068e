"""Prometheus metrics of one peer, in its own ``CollectorRegistry`` (so several servers, and tests,
never collide in the global registry).

* ``blazen_peer_calls_total{transport,method,code}`` and ``blazen_peer_call_duration_seconds{transport,
  method}``: ``method`` is the RPC name (``InvokeSubWorkflow``, ``DerefSessionRef``,
  ``ReleaseSessionRef``, ``StreamSubWorkflowEvents``) for both transports, ``other`` for anything else
  (bounded cardinality); ``code`` is the gRPC status name, or the HTTP status for the shim.
* ``blazen_peer_in_flight_calls{transport,method}``.
* ``blazen_peer_session_refs`` / ``blazen_peer_session_ref_bytes``: read from a callback at scrape time.
* ``blazen_peer_tls_cert_not_after_seconds``, ``blazen_peer_tls_reloads_total``,
  ``blazen_peer_tls_reload_failures_total``: read from a ``ReloadingTlsSource`` at scrape time.

``metrics.guard(transport)`` is a call guard (see ``blazen_peer.security.guard``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["PeerMetrics", "method_label"]

_METHODS = {
    "/blazen.peer.v1.BlazenPeer/InvokeSubWorkflow": "InvokeSubWorkflow",
    "/blazen.peer.v1.BlazenPeer/StreamSubWorkflowEvents": "StreamSubWorkflowEvents",
    "/blazen.peer.v1.BlazenPeer/DerefSessionRef": "DerefSessionRef",
    "/blazen.peer.v1.BlazenPeer/ReleaseSessionRef": "ReleaseSessionRef",
    "/v1/peer/invoke_sub_workflow": "InvokeSubWorkflow",
    "/v1/peer/deref_session_ref": "DerefSessionRef",
    "/v1/peer/release_session_ref": "ReleaseSessionRef",
}
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def method_label(method: str) -> str:
    return _METHODS.get(method, "other")


def _code_label(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)


class _CallbackCollector:
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect


class PeerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "blazen_peer") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self.calls = Counter(
            "calls",
            "Calls answered, by transport, method and status code.",
            ["transport", "method", "code"],
            namespace=namespace,
            registry=self.registry,
        )
        self.duration = Histogram(
            "call_duration_seconds",
            "Call latency, by transport and method.",
            ["transport", "method"],
            namespace=namespace,
            registry=self.registry,
            buckets=_BUCKETS,
        )
        self.in_flight = Gauge(
            "in_flight_calls",
            "Calls in progress, by transport and method.",
            ["transport", "method"],
            namespace=namespace,
            registry=self.registry,
        )
        self._refs: Callable[[], tuple[int, int]] | None = None
        self._tls: list[tuple[str, Any]] = []
        self.registry.register(_CallbackCollector(self._collect_callbacks))  # type: ignore[arg-type]
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    # -- per call ----------------------------------------------------------------------------------------
    def _bound(self, transport: str, method: str) -> tuple[Any, Any]:
        key = (transport, method)
        pair = self._children.get(key)
        if pair is None:
            pair = (self.duration.labels(transport, method), self.in_flight.labels(transport, method))
            self._children[key] = pair
        return pair

    def observe(self, transport: str, method: str, code: Any, seconds: float) -> None:
        label = method_label(method) if method.startswith("/") else method
        hist, _ = self._bound(transport, label)
        hist.observe(seconds)
        self.calls.labels(transport, label, _code_label(code)).inc()

    def guard(self, transport: str) -> _MetricsGuard:
        return _MetricsGuard(self, transport)

    # -- scrape-time values ------------------------------------------------------------------------------
    def track_refs(self, callback: Callable[[], tuple[int, int]]) -> None:
        """``callback() -> (refs held, bytes held)``, read at each scrape."""
        self._refs = callback

    def track_tls(self, source: Any, listener: str = "grpc") -> None:
        """A ``ReloadingTlsSource`` (anything with ``not_after_timestamp``, ``reload_count``,
        ``failure_count``)."""
        self._tls.append((listener, source))

    def _collect_callbacks(self) -> Iterator[Metric]:
        ns = self.namespace
        if self._refs is not None:
            count, size = self._refs()
            yield GaugeMetricFamily(f"{ns}_session_refs", "Session refs held by this peer.", value=count)
            yield GaugeMetricFamily(
                f"{ns}_session_ref_bytes", "Bytes of session refs held by this peer.", value=size
            )
        if self._tls:
            not_after = GaugeMetricFamily(
                f"{ns}_tls_cert_not_after_seconds",
                "notAfter of the certificate in use (Unix time).",
                labels=["listener"],
            )
            reloads = CounterMetricFamily(
                f"{ns}_tls_reloads", "Certificate sets swapped in without a restart.", labels=["listener"]
            )
            failures = CounterMetricFamily(
                f"{ns}_tls_reload_failures",
                "New certificate sets refused (invalid), the previous set kept.",
                labels=["listener"],
            )
            for listener, src in self._tls:
                ts = src.not_after_timestamp
                if ts is not None:
                    not_after.add_metric([listener], ts)
                reloads.add_metric([listener], src.reload_count)
                failures.add_metric([listener], src.failure_count)
            yield not_after
            yield reloads
            yield failures

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _MetricsGuard:
    def __init__(self, metrics: PeerMetrics, transport: str) -> None:
        self._m = metrics
        self._transport = transport

    def enter(self, method: str) -> tuple[str, float]:
        label = method_label(method)
        self._m._bound(self._transport, label)[1].inc()
        return label, time.perf_counter()

    def exit(self, state: tuple[str, float], code: Any) -> None:
        label, start = state
        hist, gauge = self._m._bound(self._transport, label)
        gauge.dec()
        hist.observe(time.perf_counter() - start)
        self._m.calls.labels(self._transport, label, _code_label(code)).inc()
