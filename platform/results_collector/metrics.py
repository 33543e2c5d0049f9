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
CACHE_BACKLOG = Gauge("mlp_collector_cache_backlog", "Status cache updates waiting for Redis (entries; see _bytes)")
CACHE_ERRORS = Counter("mlp_collector_cache_errors_total", "Failed status cache writes (kept for retry)")
CACHE_DROPPED = Counter("mlp_collector_cache_dropped_total", "Status cache updates dropped (backlog full)")
CACHE_BACKLOG_BYTES = Gauge(
    "mlp_collector_cache_backlog_bytes",
    "Bytes the status cache backlog holds (updates waiting for Redis, and the ids of requests to resync); "
    "bounded by MLP_COLLECTOR_BACKLOG_MAX_BYTES",
)
CACHE_RESYNC_PENDING = Gauge(
    "mlp_collector_cache_resync_pending",
    "Requests whose dropped status cache updates wait to be backfilled from Postgres (-1: the whole cache)",
)
CACHE_RESYNCED = Counter(
    "mlp_collector_cache_resynced_total", "Status cache entries backfilled from Postgres after updates were dropped"
)
FOLLOW_UP_BYTES = Gauge(
    "mlp_collector_follow_up_bytes",
    "Bytes the follow-up queue holds (quota commits, refusals to publish); "
    "bounded by MLP_COLLECTOR_FOLLOW_UP_MAX_BYTES",
)
FOLLOW_UP_SHED = Counter(
    "mlp_collector_follow_up_shed_total",
    "Follow-up quota commits not queued because the follow-up queue was at its bound (the worker commits first)",
)
