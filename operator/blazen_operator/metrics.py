"""Prometheus metrics of the operator (served on --metrics-port, default 8000, at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("blazen_operator_reconciles_total", "Reconcile passes by result", ["result"])
RECONCILE_SECONDS = Histogram("blazen_operator_reconcile_seconds", "Duration of a reconcile pass")
APPLIES = Counter("blazen_operator_applies_total", "Server-side applies of children", ["kind"])
STATUS_WRITES = Counter("blazen_operator_status_writes_total", "Status writes (only on change)")
PEERS = Gauge("blazen_operator_blazenpeers", "BlazenPeers seen by the last resync")
LAST_RESYNC = Gauge(
    "blazen_operator_last_resync_timestamp_seconds", "Unix time of the last successful resync"
)
WATCH_LISTS = Counter(
    "blazen_operator_child_watch_lists_total",
    "Full lists by the child watches, by kind: one at start, one more after each 410 Gone",
    ["kind"],
)
WATCH_FAILURES = Counter(
    "blazen_operator_child_watch_failures_total",
    "Child watch streams that failed (frozen, reset, refused) and were reopened, by kind",
    ["kind"],
)
