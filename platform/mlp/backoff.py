"""One backoff policy for every retry loop: exponential growth up to a cap, with optional jitter.

The delay before retry ``attempt`` (counted from 0) is at most ``min(cap_s, base_s * factor**attempt)``;
``jitter`` is the part of that ceiling drawn at random. 0: exactly the ceiling. 1: full jitter, uniform
in [0, ceiling] (AWS Architecture Blog, "Exponential Backoff And Jitter"). 0.5: uniform in
[ceiling/2, ceiling]. Jitter keeps processes that failed together from retrying together.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float
    cap_s: float
    factor: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must lie in [0, 1], got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The longest delay before retry ``attempt`` (0: the first retry)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        try:
            grown = self.base_s * float(self.factor) ** attempt
        except OverflowError:  # e.g. 2.0**1024: the cap was reached long before
            return self.cap_s
        return min(self.cap_s, grown)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before retry ``attempt``; ``rng``: the jitter's source (default: the ``random`` module's)."""
        ceiling = self.ceiling(attempt)
        if not self.jitter:
            return ceiling
        draw = rng.random() if rng is not None else random.random()
        return ceiling * (1 - self.jitter) + ceiling * self.jitter * draw

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The delays before retry 0, 1, 2, ... without end (take as many as there are retries)."""
        return (self.delay(attempt, rng) for attempt in itertools.count())
