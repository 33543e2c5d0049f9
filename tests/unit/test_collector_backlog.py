"""The collector's byte accounting (results_collector.backlog) and the follow-up's item sizes: pure."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

from events.model import InferenceRequested
from events.request_rules import Rejection
from projections.sample_events import request_stream
from results_collector.backlog import ByteDeque, IdSet, id_bytes, update_bytes
from results_collector.follow_up import Commit, Refusal, item_bytes


def test_an_update_is_sized_by_what_it_holds() -> None:
    small = update_bytes(("r1", "completed", {"completion": "x"}))
    large = update_bytes(("r1", "completed", {"completion": "x" * 100_000}))
    assert large - small >= 100_000 - 1
    assert small > sys.getsizeof("x")


def test_a_byte_deque_keeps_its_sum_through_take_and_put_back() -> None:
    backlog: ByteDeque[str] = ByteDeque(len)
    for item in ("a", "bb", "cccc"):
        backlog.append(item)
    assert (len(backlog), backlog.bytes) == (3, 7)
    taken = backlog.take(2)
    assert (taken, backlog.bytes) == (["a", "bb"], 4)
    backlog.put_back(taken)
    assert (list(backlog), backlog.bytes) == (["a", "bb", "cccc"], 7)
    assert backlog.popleft() == "a"
    assert backlog.bytes == 6


def test_an_id_set_is_deduplicated_in_arrival_order() -> None:
    ids = IdSet()
    for request_id in ("a", "b", "a", "c"):
        ids.add(request_id)
    assert (len(ids), ids.bytes) == (3, id_bytes("a") + id_bytes("b") + id_bytes("c"))
    assert ids.take(2) == ["a", "b"]
    assert (len(ids), ids.bytes) == (1, id_bytes("c"))
    ids.clear()
    assert (bool(ids), ids.bytes) == (False, 0)


def test_follow_up_items_are_sized_by_their_payload() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert item_bytes(Commit("r", "u", 5, at, b"x" * 50_000)) > 50_000 > item_bytes(Commit("r", "u", 5, at, b"{}"))
    request = request_stream("alice.sized")[0]
    assert isinstance(request, InferenceRequested)
    rejection = Rejection("unknown_model", "not served")
    assert item_bytes(Refusal(request, rejection)) > sys.getsizeof(request.prompt)
