"""Prometheus metrics of the results collector (served on its /metrics side port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "mlp_collector_events_total",
    "Events handled by the collector, by type and outcome (stored, duplicate, rejected, requeued, refused: "
    "an untrusted request not stored as it came, answered instead)",
    ["type", "outcome"],
)
BATCH_SIZE = Histogram(
    "mlp_collector_batch_size",
    "Events per Postgres transaction",
    buckets=(1, 5, 10, 25, 50, 100, 200, 300, 500, 1000),
)
BATCH_SECONDS = Histogram("mlp_collector_batch_seconds", "Time to store and project one batch")
# The distribution; mlp.metrics.PROJECTION_LAG (a gauge) holds the lag of the last projected event.
PROJECTION_DELAY = Histogram(
    "mlp_collector_projection_delay_seconds",
    "From an event's occurred_at to its commit in the read models",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
WRITE_ERRORS = Counter("mlp_collector_write_errors_total", "Failed Postgres batch writes (retried or isolated)")
CACHE_BACKLOG = Gauge("mlp_collector_cache_backlog", "Status cache updates waiting for Redis")
CACHE_ERRORS = Counter("mlp_collector_cache_errors_total", "Failed status cache writes (kept for retry)")
CACHE_DROPPED = Counter("mlp_collector_cache_dropped_total", "Status cache updates dropped (backlog full)")
