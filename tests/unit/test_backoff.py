"""mlp.backoff.Backoff: exponential growth, the cap, the jitter, argument checks; and the delays each user relies on."""

from __future__ import annotations

import itertools
import random

import pytest

from ml_worker.handler import TRANSIENT_BACKOFF
from mlp.backoff import Backoff
from results_collector.batcher import WRITE_BACKOFF


def _first(backoff: Backoff, n: int, rng: random.Random | None = None) -> list[float]:
    return list(itertools.islice(backoff.delays(rng), n))


def test_without_jitter_the_delays_double_up_to_the_cap() -> None:
    assert _first(Backoff(base_s=0.5, cap_s=5.0), 7) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert _first(Backoff(base_s=1.0, cap_s=100.0, factor=3.0), 4) == [1.0, 3.0, 9.0, 27.0]


def test_the_workers_dependency_retries_wait_half_a_second_then_up_to_five() -> None:
    # The sequence the handler used as a literal before: (0.5, 1.0, 2.0, 4.0, 5.0), then 5.0 for good.
    assert [TRANSIENT_BACKOFF.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_full_jitter_keeps_each_delay_within_its_exponential_bound() -> None:
    full = Backoff(base_s=0.1, cap_s=10.0, jitter=1.0)
    for seed in range(200):
        delays = _first(full, 6, random.Random(seed))
        assert len(delays) == 6
        for attempt, delay in enumerate(delays):
            assert 0.0 <= delay <= 0.1 * 2**attempt


def test_full_jitter_never_exceeds_the_cap_even_for_many_retries() -> None:
    delays = _first(Backoff(base_s=0.5, cap_s=3.0, jitter=1.0), 2000, random.Random(7))
    assert max(delays) <= 3.0
    # Full jitter: the later delays spread over the whole [0, cap] range.
    assert min(delays[10:]) < 0.5 < 2.5 < max(delays[10:])


def test_half_jitter_stays_in_the_upper_half_of_the_ceiling() -> None:
    for attempt in range(12):
        ceiling = WRITE_BACKOFF.ceiling(attempt)
        assert ceiling == min(5.0, 0.1 * 2**attempt)
        for seed in range(50):
            assert ceiling / 2 <= WRITE_BACKOFF.delay(attempt, random.Random(seed)) <= ceiling


def test_same_seed_same_delays_and_jitter_differs_between_seeds() -> None:
    full = Backoff(base_s=0.2, cap_s=5.0, jitter=1.0)
    assert _first(full, 5, random.Random(3)) == _first(full, 5, random.Random(3))
    assert _first(full, 5, random.Random(3)) != _first(full, 5, random.Random(4))


def test_a_huge_attempt_is_the_cap_not_an_overflow() -> None:
    assert Backoff(base_s=0.5, cap_s=3.0).delay(5000) == 3.0


@pytest.mark.parametrize(
    ("base_s", "cap_s", "factor", "jitter"),
    [(0.0, 1.0, 2.0, 0.0), (2.0, 1.0, 2.0, 0.0), (0.1, 1.0, 0.5, 0.0), (0.1, 1.0, 2.0, 1.5), (0.1, 1.0, 2.0, -0.1)],
)
def test_bad_policies_are_refused(base_s: float, cap_s: float, factor: float, jitter: float) -> None:
    with pytest.raises(ValueError, match=r"base_s|factor|jitter"):
        Backoff(base_s=base_s, cap_s=cap_s, factor=factor, jitter=jitter)


def test_a_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff(base_s=0.1, cap_s=1.0).delay(-1)
