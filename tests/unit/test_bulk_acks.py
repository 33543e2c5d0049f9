"""The bookkeeping of bulk acks (mlp.acks.TagRun): a multiple ack only ever covers finished deliveries."""

from __future__ import annotations

import random

from mlp.acks import AckOutbox, TagRun


def test_a_run_is_acked_up_to_its_first_gap() -> None:
    run = TagRun()
    for tag in (2, 3, 5):
        run.finish(tag, needs_ack=True)
    assert run.advance() is None  # tag 1 is still in hand
    run.finish(1, needs_ack=True)
    assert run.advance() == 3  # 1..3 in one ack; 5 waits for 4
    assert run.acked_through == 3
    run.finish(4, needs_ack=True)
    assert run.advance() == 5


def test_tags_settled_one_by_one_let_the_run_pass_but_are_never_the_target() -> None:
    run = TagRun()
    run.finish(1, needs_ack=True)
    run.finish(2, needs_ack=False)  # rejected on its own
    assert run.advance() == 1
    assert run.acked_through == 2
    run.finish(3, needs_ack=False)
    assert run.advance() is None  # nothing to ack: 3 was settled already


def test_stragglers_are_acked_one_by_one_once_and_then_let_the_run_pass() -> None:
    run = TagRun()
    for tag in (2, 3):
        run.finish(tag, needs_ack=True)
    assert run.stragglers() == [2, 3]
    assert run.stragglers() == []  # not twice
    run.finish(1, needs_ack=True)
    assert run.advance() == 1  # 2 and 3 are settled: the multiple ack stops at 1
    assert run.acked_through == 3


def test_in_any_order_every_finished_tag_is_covered_once_and_no_unfinished_one_ever() -> None:
    rng = random.Random(7)
    for _ in range(50):
        tags = list(range(1, 101))
        rng.shuffle(tags)
        run, covered, finished = TagRun(), 0, set()
        for tag in tags:
            finished.add(tag)
            run.finish(tag, needs_ack=True)
            target = run.advance()
            if target is not None:
                assert set(range(covered + 1, target + 1)) <= finished
                covered = target
        assert covered == 100


def test_the_outbox_sends_the_multiple_ack_first_and_drops_what_it_covers() -> None:
    outbox = AckOutbox()
    outbox.add(7, multiple=False)
    outbox.add(12, multiple=False)
    outbox.add(9, multiple=True)  # covers 7, not 12
    outbox.add(5, multiple=False)  # covered already: never sent after the multiple ack for 9
    assert outbox.next_frame() == (9, True)
    assert outbox.next_frame() == (12, False)
    assert outbox.next_frame() is None


def test_the_outbox_never_sends_an_ack_below_a_multiple_one_sent_before() -> None:
    rng = random.Random(11)
    for _ in range(200):
        outbox, sent = AckOutbox(), list[tuple[int, bool]]()
        for _ in range(30):
            outbox.add(rng.randint(1, 40), multiple=rng.random() < 0.3)
            if rng.random() < 0.5 and (frame := outbox.next_frame()) is not None:
                sent.append(frame)
        while (frame := outbox.next_frame()) is not None:
            sent.append(frame)
        covered = 0
        for tag, multiple in sent:
            assert tag > covered  # the broker still knows it
            if multiple:
                covered = tag
