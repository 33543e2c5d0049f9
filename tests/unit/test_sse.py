"""The SSE stream's pure rules (read_api.sse) and the queue position's arithmetic (projections.queue_position)."""

from __future__ import annotations

import typing

import pytest

from events.model import AnyEvent, new_event_id
from events.status import TERMINAL_STATUSES, status_of
from projections.event_log import EventHead
from projections.queue_position import eta_seconds, queue_position
from projections.sample_events import request_stream
from read_api.sse import TERMINAL_TYPES, ended, format_sse, parse_event_id, sent_through, unsent


def head(position: int, name: str, type_: str = "InferenceStarted", tx: str | None = None) -> EventHead:
    return EventHead(position=position, tx=tx or f"tx{position}", event_id=name, type=type_)


def test_the_terminal_types_are_the_unions_outcomes_by_the_status_rules() -> None:
    samples: dict[str, AnyEvent] = {}
    for outcome in ("completed", "failed", "rejected"):
        for event in request_stream(new_event_id(), outcome=outcome):
            samples[type(event).__name__] = event
    union = {t.__name__ for t in typing.get_args(AnyEvent)}
    assert set(samples) <= union
    for name, event in samples.items():
        assert (name in TERMINAL_TYPES) == (status_of(event) in TERMINAL_STATUSES), name
    assert union >= TERMINAL_TYPES


def test_a_resumed_client_holds_what_sorts_before_its_last_event_and_was_stored_with_or_before_it() -> None:
    # stream order a, b, c, d; stored (position) in the order a, c, b(late), d
    a, b, c, d = head(1, "a", "InferenceRequested"), head(3, "b"), head(2, "c"), head(4, "d", "InferenceCompleted")
    heads = [a, b, c, d]
    assert sent_through(heads, "c") == {"a", "c"}  # b sorts before c but was stored after it: never sent
    assert unsent(heads, sent_through(heads, "c")) == [b, d]
    assert sent_through(heads, "b") == {"a", "b"}  # c (stored before b, sorted after) comes again: at least once
    assert sent_through(heads, "d") == {"a", "b", "c", "d"}
    assert sent_through(heads, "unknown") == set()  # not this stream's: from the start
    assert sent_through(heads, None) == set()


def test_events_stored_in_one_transaction_were_visible_together() -> None:
    # one batch: positions within it say nothing of what a reader saw first
    heads = [head(7, "a", tx="t1"), head(5, "b", tx="t1"), head(6, "c", "InferenceCompleted", tx="t1")]
    assert sent_through(heads, "c") == {"a", "b", "c"}
    assert ended(heads, {"a", "b", "c"})
    assert not ended(heads, {"a", "b"})


def test_an_sse_message_and_resume_ids() -> None:
    assert format_sse("e", "T", "x\r\ny") == b"id: e\nevent: T\ndata: x\ndata: y\n\n"
    assert format_sse("e\n", "T\r", "") == b"id: e \nevent: T \ndata: \n\n"  # no field breaks out of its line
    upper = "0193A4F1-5C1E-7D2A-9B3C-2F4E5A6B7C8D"
    assert parse_event_id(upper) == upper.lower()  # as the store writes it (uuid::text)
    assert parse_event_id(None) is None
    assert parse_event_id(" ") is None
    with pytest.raises(ValueError, match="badly formed"):
        parse_event_id("not-an-id")
    with pytest.raises(ValueError, match="too long"):
        parse_event_id("a" * 65)


def test_queue_position_and_eta() -> None:
    assert queue_position(ticket=7, started=4) == 3
    assert queue_position(ticket=4, started=4) == 1  # being taken now
    assert queue_position(ticket=2, started=9) == 1
    assert eta_seconds(3, 1500.0) == 4.5
    assert eta_seconds(3, None) is None
