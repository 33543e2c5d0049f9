"""The comparisons of ``mlp reconcile``: pure functions from what was read to the drift found (no I/O).

A ``Drift`` row says which check found it, what it concerns (``key``), what the truth says
(``expected``: the event store, or the ledger for the derived copies) and what was found (``actual``).
Zero rows: the books balance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final, Literal

from events.model import TERMINAL_EVENTS, InferenceRejected, InferenceRequested

Check = Literal["stream", "read_model", "ledger", "redis"]
CHECKS: Final[tuple[Check, ...]] = ("stream", "read_model", "ledger", "redis")
MISSING: Final = "(missing)"
ABSENT: Final = "(no row)"


@dataclass(frozen=True, order=True)
class Drift:
    check: Check
    key: str
    expected: str
    actual: str

    @property
    def identity(self) -> tuple[str, str]:
        return (self.check, self.key)

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "key": self.key, "expected": self.expected, "actual": self.actual}


# --- every request has exactly one InferenceRequested and one terminal event ---------------------


@dataclass(frozen=True)
class StreamCounts:
    request_id: str
    requested: int
    terminal: int
    last_event_at: datetime
    outcome: str | None = None  # the type of its (first) terminal event


# The event store holds type names (event_store.type).
TERMINAL_TYPES: Final = frozenset(t.__name__ for t in TERMINAL_EVENTS)
REQUESTED_TYPE: Final = InferenceRequested.__name__
REJECTED_TYPE: Final = InferenceRejected.__name__


def count_streams(events: Iterable[tuple[str, str, datetime]]) -> list[StreamCounts]:
    """(request_id, event type, occurred_at) of stored events -> each request's counts."""
    counts: dict[str, StreamCounts] = {}
    for request_id, kind, occurred_at in events:
        seen = counts.get(request_id)
        requested = (seen.requested if seen else 0) + (kind == REQUESTED_TYPE)
        terminal = (seen.terminal if seen else 0) + (kind in TERMINAL_TYPES)
        last = max(seen.last_event_at, occurred_at) if seen else occurred_at
        outcome = (seen.outcome if seen else None) or (kind if kind in TERMINAL_TYPES else None)
        counts[request_id] = StreamCounts(request_id, requested, terminal, last, outcome)
    return [counts[k] for k in sorted(counts)]


def stream_drift(streams: Iterable[StreamCounts], now: datetime, grace_s: float) -> list[Drift]:
    """A request with two outcomes, without an outcome although its last event is older than ``grace_s``
    (younger ones may still be queued or running), or without its InferenceRequested. A rejection alone
    is a whole stream: a poison message that names its request is rejected, its body never stored."""
    found: list[Drift] = []
    for s in streams:
        key = f"request/{s.request_id}"
        if s.requested > 1 or (s.requested == 0 and s.outcome != REJECTED_TYPE):
            found.append(Drift("stream", key, "1 InferenceRequested", f"{s.requested} InferenceRequested"))
        if s.terminal > 1 or (s.terminal == 0 and (now - s.last_event_at).total_seconds() > grace_s):
            found.append(Drift("stream", key, "1 terminal event", f"{s.terminal} terminal events"))
    return sorted(found)


# --- read models equal a fresh projection ---------------------------------------------------------

Row = Mapping[str, Any]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, datetime | date):
        return value.isoformat()
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def row_drift(table: str, fresh: Mapping[str, Row], live: Mapping[str, Row]) -> list[Drift]:
    """Rows of ``table`` by key: the fresh projection (expected) against the live read model (actual).
    One Drift per row that differs, naming the columns that differ."""
    found: list[Drift] = []
    for key in sorted(fresh.keys() | live.keys()):
        name = f"{table}/{key}"
        want, have = fresh.get(key), live.get(key)
        if want is None:
            found.append(Drift("read_model", name, ABSENT, "a row"))
        elif have is None:
            found.append(Drift("read_model", name, "a row", MISSING))
        else:
            columns = [c for c in want if want[c] != have.get(c)]
            if columns:
                expected = ", ".join(f"{c}={_show(want[c])}" for c in columns)
                actual = ", ".join(f"{c}={_show(have.get(c))}" for c in columns)
                found.append(Drift("read_model", name, expected, actual))
    return found


# --- the daily aggregate equals the ledger -------------------------------------------------------


@dataclass(frozen=True, order=True)
class UsageKey:
    user_id: str
    day: date
    model: str

    def __str__(self) -> str:
        return f"{self.user_id}/{self.day.isoformat()}/{self.model}"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int

    def __str__(self) -> str:
        return (
            f"prompt={self.prompt_tokens} completion={self.completion_tokens}"
            f" total={self.total_tokens} requests={self.requests}"
        )


def ledger_drift(ledger: Mapping[UsageKey, Usage], daily: Mapping[UsageKey, Usage]) -> list[Drift]:
    """``token_usage_daily`` (actual) against the sums of the ``token_usage`` ledger (expected)."""
    found: list[Drift] = []
    for key in sorted(ledger.keys() | daily.keys()):
        want, have = ledger.get(key), daily.get(key)
        if want != have:
            found.append(
                Drift(
                    "ledger",
                    f"token_usage_daily/{key}",
                    ABSENT if want is None else str(want),
                    MISSING if have is None else str(have),
                )
            )
    return found


# --- the Redis counters equal the ledger plus the open reservations ------------------------------


CounterKind = Literal["used_day", "used_month", "reserved"]


@dataclass(frozen=True, order=True)
class CounterKey:
    """One Redis quota counter: ``used_day``/``used_month`` of a window, or a user's live ``reserved`` sum."""

    kind: CounterKind
    user_id: str
    window: str = ""  # the day (2025-01-31) or month (2025-01) id; "" for reserved

    def __str__(self) -> str:
        return f"{self.kind}/{self.user_id}" + (f"/{self.window}" if self.window else "")


def expected_counters(
    day_usage: Mapping[tuple[str, str], int],
    month_usage: Mapping[tuple[str, str], int],
    open_reservations: Mapping[str, int],
) -> dict[CounterKey, int]:
    """What the counters must hold: the ledger's tokens per (user, window) and each user's open holds."""
    expected = {CounterKey("used_day", user, day): tokens for (user, day), tokens in day_usage.items()}
    expected |= {CounterKey("used_month", user, month): tokens for (user, month), tokens in month_usage.items()}
    expected |= {CounterKey("reserved", user): tokens for user, tokens in open_reservations.items()}
    return expected


def counter_drift(expected: Mapping[CounterKey, int], actual: Mapping[CounterKey, int]) -> list[Drift]:
    """A counter that does not exist holds 0 (the scripts read a missing key as 0)."""
    return [
        Drift("redis", f"quota/{key}", str(expected.get(key, 0)), str(actual.get(key, 0)))
        for key in sorted(expected.keys() | actual.keys())
        if expected.get(key, 0) != actual.get(key, 0)
    ]


# --- the report -----------------------------------------------------------------------------------


def confirmed(first: Sequence[Drift], second: Sequence[Drift]) -> list[Drift]:
    """The drift of a second look that the first one saw too: a write in flight between a Postgres read
    and a Redis read (or a request finishing meanwhile) is not drift."""
    seen = {d.identity for d in first}
    return [d for d in second if d.identity in seen]


def render_table(drifts: Sequence[Drift]) -> str:
    headers = ("CHECK", "KEY", "EXPECTED", "ACTUAL")
    rows = [(d.check, d.key, d.expected, d.actual) for d in drifts]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.append(f"{len(rows)} drift row(s)")
    return "\n".join(lines)
