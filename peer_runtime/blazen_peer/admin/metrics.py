"""Prometheus metrics of one peer, in its own ``CollectorRegistry`` (so several servers, and tests,
never collide in the global registry).

* ``blazen_peer_calls_total{transport,method,code}`` and ``blazen_peer_call_duration_seconds{transport,
  method}``: ``method`` is the RPC name (``InvokeSubWorkflow``, ``DerefSessionRef``,
  ``ReleaseSessionRef``, ``StreamSubWorkflowEvents``) for both transports, ``Describe``, ``RunStep`` and
  ``EndRun`` for the fleet router's ``blazen.fleet.v1.Fleet`` calls, ``other`` for anything else (bounded
  cardinality); ``code`` is the
  gRPC status name, or the HTTP status for the shim.
* ``blazen_peer_in_flight_calls{transport,method}``.
* ``blazen_peer_session_refs`` / ``blazen_peer_session_ref_bytes``: read from a callback at scrape time.
* ``blazen_peer_tls_cert_not_after_seconds``, ``blazen_peer_tls_reloads_total``,
  ``blazen_peer_tls_reload_failures_total``: read from a ``ReloadingTlsSource`` at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ..wire.protocol import METHOD_DESCRIBE, METHOD_END_RUN, PATH_DESCRIBE, PATH_END_RUN, RPC_NAMES

__all__ = ["CallStats", "PeerMetrics", "method_label"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BOUND_LABELS = tuple(floatToGoString(b) for b in _BUCKETS)
CALL_LABELS = ["transport", "method", "code"]


# Describe and EndRun are not in RPC_NAMES: that map is also the set of calls the concurrency limit counts.
_LABELS = {**RPC_NAMES, PATH_DESCRIBE: METHOD_DESCRIBE, PATH_END_RUN: METHOD_END_RUN}


def method_label(method: str) -> str:
    return _LABELS.get(method, "other")


class _CallbackCollector:
    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self.collect = collect


class CallStats:
    """Per (transport, method): in-flight count, answers by code, latency histogram. Plain numbers behind
    one lock, turned into metric families at scrape time: recording a call costs ~1 µs, where
    prometheus_client's labelled Counter + Histogram + Gauge cost several."""

    __slots__ = ("_lock", "buckets", "codes", "in_flight", "sum")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.codes: dict[str, int] = {}
        self.buckets = [0] * (len(_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def start(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finish(self, code: str, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.codes[code] = self.codes.get(code, 0) + 1
            self.buckets[bisect_left(_BUCKETS, seconds)] += 1
            self.sum += seconds


class PeerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "blazen_peer") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace
        self._stats: dict[tuple[str, str], CallStats] = {}
        self._stats_lock = threading.Lock()
        self._refs: Callable[[], tuple[int, int]] | None = None
        self._tls: list[tuple[str, Any]] = []
        self.registry.register(_CallbackCollector(self._collect_calls))
        self.registry.register(_CallbackCollector(self._collect_callbacks))

    # -- per call ----------------------------------------------------------------------------------------
    def stats(self, transport: str, method: str) -> CallStats:
        """The recorder of one (transport, method label); keep it to record calls without a lookup."""
        key = (transport, method)
        st = self._stats.get(key)
        if st is None:
            with self._stats_lock:
                st = self._stats.setdefault(key, CallStats())
        return st

    def _collect_calls(self) -> Iterator[Metric]:
        ns = self.namespace
        calls = CounterMetricFamily(
            f"{ns}_calls", "Calls answered, by transport, method and status code.", labels=CALL_LABELS
        )
        duration = HistogramMetricFamily(
            f"{ns}_call_duration_seconds", "Call latency, by transport and method.", labels=CALL_LABELS[:2]
        )
        in_flight = GaugeMetricFamily(
            f"{ns}_in_flight_calls", "Calls in progress, by transport and method.", labels=CALL_LABELS[:2]
        )
        for (transport, method), st in sorted(self._stats.items()):
            with st._lock:
                codes = sorted(st.codes.items())
                buckets, total, busy = list(st.buckets), st.sum, st.in_flight
            for code, n in codes:
                calls.add_metric([transport, method, code], n)
            cumulative, acc = [], 0
            for bound, n in zip((*_BOUND_LABELS, "+Inf"), buckets, strict=True):
                acc += n
                cumulative.append((bound, acc))
            duration.add_metric([transport, method], cumulative, total)
            in_flight.add_metric([transport, method], busy)
        yield calls
        yield duration
        yield in_flight

    # -- scrape-time values ------------------------------------------------------------------------------
    def track_refs(self, callback: Callable[[], tuple[int, int]]) -> None:
        """``callback() -> (refs held, bytes held)``, read at each scrape."""
        self._refs = callback

    def add_collector(self, collect: Callable[[], Iterator[Metric]]) -> None:
        """More metric families, produced at each scrape by ``collect()`` (the router's per-replica ones)."""
        self.registry.register(_CallbackCollector(collect))

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
