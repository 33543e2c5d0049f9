"""Backoff for retrying transient Triton errors (the worker owns the retry loop).

Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"):
the n-th delay is uniform in [0, min(cap, base * 2**n)], so workers that failed together do
not retry together.
"""

from __future__ import annotations

import random


def backoff_delays(retries: int, base_s: float, cap_s: float, rng: random.Random) -> list[float]:
    """The delays before each of ``retries`` retries, in seconds."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if base_s <= 0 or cap_s < base_s:
        raise ValueError(f"need 0 < base_s <= cap_s, got base_s={base_s}, cap_s={cap_s}")
    # Clamp the exponent: 2.0**1024 raises OverflowError, and any cap is reached long before.
    return [rng.uniform(0.0, min(cap_s, base_s * 2.0 ** min(attempt, 1023))) for attempt in range(retries)]
