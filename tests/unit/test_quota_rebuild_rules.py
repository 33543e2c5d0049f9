"""The quota rebuild's pure rules: which ledger rows its snapshot counted, which holds it restores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from quota.ledger import open_reservation_args
from quota.plans import to_ms
from quota.store import LedgerSnapshot, OpenReservation


def test_a_snapshot_round_trips_through_its_text() -> None:
    snap = LedgerSnapshot.parse("100:110:103,105")
    assert snap == LedgerSnapshot(100, 110, frozenset({103, 105}))
    assert LedgerSnapshot.parse(snap.text()) == snap
    assert LedgerSnapshot.parse("7:7:") == LedgerSnapshot(7, 7, frozenset())


def test_a_snapshot_counts_the_rows_of_transactions_committed_before_it() -> None:
    snap = LedgerSnapshot.parse("100:110:103,105")
    assert snap.counts(99)  # finished before the snapshot
    assert snap.counts(104)  # between xmin and xmax, not in progress
    assert not snap.counts(103)  # in progress at the snapshot: its rows came later
    assert not snap.counts(110)  # started after it
    assert not snap.counts(5_000)
    assert snap.counts(2)  # frozen


def test_a_row_id_is_read_in_the_64_bit_space_near_the_snapshot() -> None:
    epoch = 3 << 32
    near_the_wrap = LedgerSnapshot(epoch + 2**32 - 20, epoch + 2**32 - 10, frozenset())
    assert near_the_wrap.counts(2**32 - 30)  # just before it, in the same epoch
    assert not near_the_wrap.counts(2**32 - 5)  # just after it, same epoch
    assert not near_the_wrap.counts(40)  # after it, already in the next epoch
    after_the_wrap = LedgerSnapshot(epoch + 10, epoch + 20, frozenset())
    assert after_the_wrap.counts(2**32 - 30)  # the previous epoch's: long done
    assert not after_the_wrap.counts(25)


def test_only_live_holds_are_restored() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    ttl_ms = 300_000
    holds = [
        OpenReservation("live", "u", 10, now - timedelta(seconds=10)),
        OpenReservation("expired", "u", 20, now - timedelta(seconds=300)),
        OpenReservation("unstarted", "v", 30, None),
    ]
    assert open_reservation_args(holds, to_ms(now), ttl_ms) == [
        "live",
        "u",
        10,
        to_ms(now) - 10_000 + ttl_ms,
        "unstarted",
        "v",
        30,
        to_ms(now) + ttl_ms,
    ]
