"""The platform's Prometheus metrics, in one place, in the default registry (served on ``/metrics``).

Labels are bounded sets only (model, reason, status, error code, token type): never a user id or a
request id, which would create one time series per user or request.
"""

from __future__ import annotations

import importlib.metadata
from datetime import UTC, datetime
from typing import Final, Literal

from prometheus_client import Counter, Gauge, Histogram, Info

# Inference on CPU Triton takes milliseconds to seconds; LLM backends up to a minute.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Submit to outcome: the inference plus the time queued, which under a backlog is minutes.
REQUEST_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

TokenType = Literal["prompt", "completion"]


def _version() -> str:
    try:
        return importlib.metadata.version("inference-platform")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


# --- every process ---------------------------------------------------------------------------
# The conventional *_build_info: `mlp status` and dashboards read each service's version from it.
BUILD_INFO: Final = Info("mlp_build", "The running platform's version.")
BUILD_INFO.info({"version": _version()})

# --- gateway -------------------------------------------------------------------------------------
REQUESTS_ACCEPTED: Final = Counter(
    "mlp_requests_accepted", "Inference requests accepted by the gateway (202).", ["model"]
)
REQUESTS_REJECTED: Final = Counter(
    "mlp_requests_rejected",
    "Inference requests refused by the gateway, by reason (quota_exceeded, invalid_request, "
    "unknown_model, prompt_too_large, max_tokens_too_large, publish_failed, queue_full, quota_unavailable; "
    "unauthorized, forbidden, auth_unavailable: the API key's checks).",
    ["reason"],
)
QUEUE_MAX_LENGTH: Final = Gauge(
    "mlp_queue_max_length",
    "The bound of each model's request queue (MLP_MAX_QUEUED_PER_MODEL, a RabbitMQ policy): past it a submit "
    "answers 503 queue_full.",
    ["model"],
)

# --- every service with dependencies --------------------------------------------------------------
DEPENDENCY_UP: Final = Gauge(
    "mlp_dependency_up",
    "1 when the dependency answered the last readiness check, else 0 (a required one makes the service "
    "unready; a degraded one has a fallback).",
    ["dependency"],
)

# --- worker --------------------------------------------------------------------------------------
INFERENCE_LATENCY: Final = Histogram(
    "mlp_inference_latency_seconds",
    "Duration of the Triton inference call, retries included.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE: Final = Histogram(
    "mlp_batch_size", "Requests sent to Triton in one call.", ["model"], buckets=BATCH_BUCKETS
)
TOKENS_PROCESSED: Final = Counter(
    "mlp_tokens_processed", "Tokens processed, by model and type (prompt/completion).", ["model", "type"]
)
QUOTA_REJECTIONS: Final = Counter(
    "mlp_quota_rejections", "Requests refused because the user's quota was spent.", ["model", "stage"]
)
OUTCOMES: Final = Counter(
    "mlp_outcomes",
    "Terminal outcomes of requests, by status (completed/failed/rejected) and error code ('' if none).",
    ["status", "error_code"],
)
REQUEST_DURATION: Final = Histogram(
    "mlp_request_duration_seconds",
    "From submit (InferenceRequested.occurred_at) to the outcome's occurred_at, by model and status.",
    ["model", "status"],
    buckets=REQUEST_BUCKETS,
)

# --- quota (gateway and worker) ------------------------------------------------------------------
QUOTA_REBUILDS: Final = Counter(
    "mlp_quota_rebuilds",
    "Rebuilds of the Redis quota counters from the Postgres ledger run by this process, by outcome (done, failed).",
    ["outcome"],
)
QUOTA_REBUILD_IN_PROGRESS: Final = Gauge(
    "mlp_quota_rebuild_in_progress", "1 while this process rebuilds the Redis quota counters from the ledger."
)
# Both outcomes exist from the start: increase() then sees a process's first failure too.
for _outcome in ("done", "failed"):
    QUOTA_REBUILDS.labels(outcome=_outcome)

# --- collector -----------------------------------------------------------------------------------
EVENTS_PROJECTED: Final = Counter("mlp_events_projected", "Events applied to the read models, by event type.", ["type"])
PROJECTION_LAG: Final = Gauge("mlp_projection_lag_seconds", "now - occurred_at of the last projected event (seconds).")


def lag_seconds(occurred_at: datetime, now: datetime | None = None) -> float:
    """Seconds between an event's occurrence and now; never negative (clocks of two hosts may differ)."""
    now = now or datetime.now(UTC)
    return max(0.0, (now - occurred_at).total_seconds())


def record_projected(event_type: str, occurred_at: datetime, now: datetime | None = None) -> None:
    EVENTS_PROJECTED.labels(type=event_type).inc()
    PROJECTION_LAG.set(lag_seconds(occurred_at, now))


def record_tokens(model: str, prompt_tokens: int, completion_tokens: int) -> None:
    TOKENS_PROCESSED.labels(model=model, type="prompt").inc(prompt_tokens)
    TOKENS_PROCESSED.labels(model=model, type="completion").inc(completion_tokens)


def record_outcome(status: str, error_code: str | None = None) -> None:
    OUTCOMES.labels(status=status, error_code=error_code or "").inc()


def record_request_duration(model: str, status: str, submitted_at: datetime, finished_at: datetime) -> None:
    """Submit to outcome, on the events' clocks (gateway and worker hosts; never negative)."""
    REQUEST_DURATION.labels(model=model, status=status).observe(lag_seconds(submitted_at, finished_at))
