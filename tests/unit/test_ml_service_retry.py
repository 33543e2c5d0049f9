"""backoff_delays: exponential growth, full jitter, the cap, argument checks."""

from __future__ import annotations

import random

import pytest

from ml_service.retry import backoff_delays


def test_no_retries_no_delays() -> None:
    assert backoff_delays(0, 0.2, 5.0, random.Random(1)) == []


def test_each_delay_lies_within_its_exponential_bound() -> None:
    for seed in range(200):
        delays = backoff_delays(6, 0.1, 10.0, random.Random(seed))
        assert len(delays) == 6
        for attempt, delay in enumerate(delays):
            assert 0.0 <= delay <= 0.1 * 2**attempt


def test_delays_never_exceed_the_cap_even_for_many_retries() -> None:
    delays = backoff_delays(2000, 0.5, 3.0, random.Random(7))
    assert max(delays) <= 3.0
    # Full jitter: the later delays spread over the whole [0, cap] range.
    assert min(delays[10:]) < 0.5 < 2.5 < max(delays[10:])


def test_same_seed_same_delays_and_jitter_differs_between_seeds() -> None:
    assert backoff_delays(5, 0.2, 5.0, random.Random(3)) == backoff_delays(5, 0.2, 5.0, random.Random(3))
    assert backoff_delays(5, 0.2, 5.0, random.Random(3)) != backoff_delays(5, 0.2, 5.0, random.Random(4))


@pytest.mark.parametrize(("retries", "base_s", "cap_s"), [(-1, 0.1, 1.0), (3, 0.0, 1.0), (3, 2.0, 1.0)])
def test_bad_arguments_are_refused(retries: int, base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError, match=r"retries|base_s"):
        backoff_delays(retries, base_s, cap_s, random.Random(0))
