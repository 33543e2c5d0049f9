"""Idempotency records are namespaced per user: no two (user, key) pairs name the same Redis key."""

from __future__ import annotations

import itertools
import re

import pytest

from api_gateway.idempotency import IDEMPOTENCY_KEY_PATTERN, pending_ttl_for
from mlp.cache import Keys

KEYS = Keys("mlp:")


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("a:b", "c"), ("a", "b:c")),
        (("a", "b:c:d"), ("a:b", "c:d")),
        (("1:a", "b"), ("1", "a:b")),  # a user id that looks like the length prefix
    ],
)
def test_pairs_that_once_collided_name_different_records(one: tuple[str, str], other: tuple[str, str]) -> None:
    assert KEYS.idempotency(*one) != KEYS.idempotency(*other)


def test_every_pair_of_a_small_alphabet_names_its_own_record() -> None:
    parts = ["", "a", ":", "a:", ":a", "1", "1:", "a:1", "::"]
    users = [u for u in parts if u]  # user ids are never empty
    pairs = list(itertools.product(users, [k for k in parts if k]))
    names = {KEYS.idempotency(user, key) for user, key in pairs}
    assert len(names) == len(pairs)


@pytest.mark.parametrize("key", ["0193a5b2-7c3e-7d4f-8a9b-0c1d2e3f4a5b", "order:42/try=1", "k" * 128, "YWJj+/=="])
def test_the_header_pattern_admits_common_key_formats(key: str) -> None:
    assert re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)


@pytest.mark.parametrize("key", ["", "k" * 129, "with space", "é", "a\nb", "a;b"])
def test_the_header_pattern_bounds_characters_and_length(key: str) -> None:
    assert not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key)


def test_a_pending_claim_outlives_the_slowest_submit() -> None:
    assert pending_ttl_for(5.0) > 2 * 5.0
