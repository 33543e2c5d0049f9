"""Worker-only metrics; the shared ones (latency, tokens, outcomes, quota rejections) are in ``mlp.metrics``."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter

REDELIVERIES: Final = Counter(
    "mlp_worker_redeliveries",
    "Messages the worker handed back to the queue (requeue), dead-lettered (dead_letter), or answered with "
    "the outcome their request already ended with (answered_again).",
    ["model", "action"],
)
