"""The dispatcher's Prometheus metrics (bounded labels only: never a user, an endpoint or a URL)."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import Counter, Gauge

AttemptOutcome = Literal["delivered", "retry", "failed"]

DELIVERIES: Final = Counter(
    "mlp_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered (2xx), retry (to be tried again), failed (retry window"
    " spent: given up).",
    ["outcome"],
)
ENQUEUED: Final = Counter(
    "mlp_webhook_deliveries_enqueued", "Webhook deliveries enqueued (one per endpoint and event)."
)
PENDING: Final = Gauge("mlp_webhook_deliveries_pending", "Webhook deliveries pending (not yet delivered nor failed).")

for _outcome in ("delivered", "retry", "failed"):
    DELIVERIES.labels(outcome=_outcome)
BOUND_USERS: Final = Gauge(
    "mlp_webhook_bound_users", "Users whose outcome keys are bound to the webhooks queue (they have a webhook)."
)
