"""Pure pieces of ``mlp bench --soak``: the DURATION argument, the fault schedule, the load's rate,
and the report's verdict and text. Nothing here does I/O or reads a clock.

The schedule is cut into slots of ``min(60 s, duration / 4)``. Each slot opens with a kill -9 of
the worker; every third slot (the second, fifth, ...) restarts Redis a fifth into it; every other
slot (the first, third, ...) pauses the collector from two fifths into it for ``min(10 s, slot / 2)``.
A slot is used only when it ends within the duration, so every fault is over before the load
ends. At 10 minutes: 9 worker kills, 3 Redis restarts, 5 collector pauses of 10 s; at 60 s: worker
kills at 15, 30 and 45 s, a Redis restart at 33 s, collector pauses at 21-28.5 s and 51-58.5 s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from ops.bench.stats import render_rss

FaultKind = Literal["kill_worker", "restart_redis", "pause_collector"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = ("kill_worker", "restart_redis", "pause_collector")

# Shorter than this, the slots are too short for a restart to finish inside them.
MIN_SOAK_S: Final = 20.0
MAX_SOAK_S: Final = 24 * 3600.0
NOMINAL_SLOT_S: Final = 60.0  # a worker kill every minute
NOMINAL_PAUSE_S: Final = 10.0
REDIS_EVERY: Final = 3  # slots: every 3 minutes at full scale
COLLECTOR_EVERY: Final = 2  # slots: every 2 minutes at full scale
# The load's share of the measured capacity, unless --rate says otherwise.
DEFAULT_LOAD_FRACTION: Final = 0.5

_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)([smh])")


def parse_duration(text: str) -> float:
    """``10m``, ``60s``, ``1h``, ``1m30s`` or a bare number of seconds; within MIN_SOAK_S..MAX_SOAK_S."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = _PART.findall(cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise ValueError(f"not a duration (like 10m, 60s, 1m30s): {text!r}")
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not MIN_SOAK_S <= seconds <= MAX_SOAK_S:
        raise ValueError(f"a soak lasts {MIN_SOAK_S:.0f} s to {MAX_SOAK_S / 3600:.0f} h, got {text!r}")
    return seconds


@dataclass(frozen=True, slots=True, order=True)
class Fault:
    at_s: float  # seconds after the load started
    kind: FaultKind
    length_s: float = 0.0  # pause_collector: how long the collector stays stopped


def plan_faults(duration_s: float) -> list[Fault]:
    """The fault schedule of a soak of ``duration_s`` seconds (see the module's docstring), by time."""
    slot = min(NOMINAL_SLOT_S, duration_s / 4)
    pause = min(NOMINAL_PAUSE_S, slot / 2)
    faults: list[Fault] = []
    k = 1
    while (k + 1) * slot <= duration_s + 1e-9:
        start = k * slot
        faults.append(Fault(start, "kill_worker"))
        if k % REDIS_EVERY == 2 % REDIS_EVERY:
            faults.append(Fault(start + slot / 5, "restart_redis"))
        if k % COLLECTOR_EVERY == 1:
            faults.append(Fault(start + 2 * slot / 5, "pause_collector", pause))
        k += 1
    return sorted(faults)


def soak_rate(capacity_per_s: float, fraction: float = DEFAULT_LOAD_FRACTION) -> float:
    """The open-loop rate from a measured capacity: ``fraction`` of it, at least 1 request/s."""
    if not math.isfinite(capacity_per_s) or capacity_per_s <= 0:
        return 1.0
    return max(1.0, round(capacity_per_s * fraction, 1))


def capacity(completed: int, first_submit: float, last_terminal: float | None) -> float:
    """Requests per second the pipeline finished: submit of the first to the outcome of the last."""
    if completed <= 0 or last_terminal is None or last_terminal <= first_submit:
        return 0.0
    return completed / (last_terminal - first_submit)


@dataclass(frozen=True, slots=True)
class Injected:
    """One fault as it ran: when (seconds after the load started) and how long it took."""

    kind: FaultKind
    at_s: float
    took_s: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Charges:
    """What the ledger and the quota counter say of the soak's requests (after the dust settled)."""

    completed: int  # accepted requests whose outcome is InferenceCompleted
    charged_once: int  # completed requests with exactly one token_usage row
    uncharged: int  # completed requests with no token_usage row
    charged_not_completed: int  # token_usage rows of requests that did not complete (failed, rejected)
    ledger_day_tokens: int  # sum of the soak user's token_usage rows today (UTC)
    redis_day_tokens: int | None  # the soak user's Redis day counter (None: the counters are not built)
    open_reservations: int  # tokens still reserved in Redis for the soak user

    @property
    def counter_excess(self) -> int | None:
        """Redis day counter minus the ledger: > 0 is tokens charged twice, < 0 is tokens never charged."""
        return None if self.redis_day_tokens is None else self.redis_day_tokens - self.ledger_day_tokens


@dataclass(frozen=True, slots=True)
class SoakReport:
    duration_s: float
    rate: float
    rate_source: str  # "--rate" or "50% of measured capacity N req/s"
    user_id: str
    sent: int
    accepted: int
    terminal: int
    outcomes: dict[str, int]  # event type -> count, among the accepted
    lost_request_ids: list[str]  # accepted, never terminal
    multi_terminal_ids: list[str]  # accepted, more than one terminal event
    charges: Charges
    drift: list[str]  # `mlp reconcile` drift rows of the run's window, rendered
    reconcile_notes: list[str]
    faults: list[Injected]
    rss_start_kib: dict[str, int]
    rss_end_kib: dict[str, int]
    http_status: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Accepted requests that did not reach exactly one terminal state."""
        return len(self.lost_request_ids) + len(self.multi_terminal_ids)

    @property
    def double_charged(self) -> int:
        """Requests (or, from the counter, tokens) charged more than once; 0 is the goal."""
        excess = self.charges.counter_excess
        return max(0, excess or 0) + (self.charges.completed - self.charges.charged_once - self.charges.uncharged)

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["lost"] = self.lost
        document["double_charged"] = self.double_charged
        document["counter_excess"] = self.charges.counter_excess
        document["problems"] = verdict(self)
        return document


def verdict(report: SoakReport) -> list[str]:
    """Why the soak failed; empty when it passed."""
    problems: list[str] = []
    if report.accepted == 0:
        problems.append("the gateway accepted no request")
    if report.lost_request_ids:
        problems.append(f"{len(report.lost_request_ids)} accepted requests never reached a terminal state")
    if report.multi_terminal_ids:
        problems.append(f"{len(report.multi_terminal_ids)} requests reached more than one terminal state")
    c = report.charges
    if c.uncharged:
        problems.append(f"{c.uncharged} completed requests were never charged in token_usage")
    if c.charged_not_completed:
        problems.append(f"{c.charged_not_completed} requests were charged in token_usage without completing")
    if c.redis_day_tokens is None:
        problems.append("the Redis quota counters were not built at the end: the day counter was not checked")
    elif c.counter_excess:
        sign = "more" if c.counter_excess > 0 else "less"
        problems.append(
            f"the Redis day counter of {report.user_id} is {abs(c.counter_excess)} tokens {sign} than the ledger"
            f" ({c.redis_day_tokens} vs {c.ledger_day_tokens})"
        )
    if c.open_reservations:
        problems.append(f"{c.open_reservations} tokens are still reserved after every request ended")
    if report.drift:
        problems.append(f"mlp reconcile found {len(report.drift)} drift row(s)")
    missing = [kind for kind in FAULT_KINDS if not any(f.kind == kind for f in report.faults)]
    if missing:
        problems.append("faults that never ran: " + ", ".join(missing))
    return problems


def fault_counts(faults: Sequence[Injected]) -> dict[str, int]:
    return {kind: sum(1 for f in faults if f.kind == kind) for kind in FAULT_KINDS}


def render_soak(report: SoakReport) -> str:
    c = report.charges
    counts = fault_counts(report.faults)
    excess = c.counter_excess
    lines = [
        f"mlp bench --soak: {report.duration_s:.0f} s open loop at {report.rate:g} req/s ({report.rate_source}),"
        f" user {report.user_id}",
        "",
        f"  requests: sent {report.sent}, accepted {report.accepted}, terminal {report.terminal}"
        f" ({', '.join(f'{k} {v}' for k, v in sorted(report.outcomes.items())) or 'none'})",
        f"  LOST {report.lost}   DOUBLE-CHARGED {report.double_charged}",
        f"  charges (every request of the run, warm-up included): {c.charged_once} of {c.completed} completed"
        f" charged once, {c.uncharged} uncharged,"
        f" {c.charged_not_completed} charged without completing; day counter {c.redis_day_tokens} vs ledger"
        f" {c.ledger_day_tokens} tokens (excess {excess}), {c.open_reservations} still reserved",
        "  faults: " + ", ".join(f"{kind} x{n}" for kind, n in counts.items()),
    ]
    for f in report.faults:
        detail = f" ({f.detail})" if f.detail else ""
        lines.append(f"    {f.at_s:7.1f} s  {f.kind:<16} took {f.took_s:5.1f} s{detail}")
    lines.append("  RSS per service (start -> end): " + render_rss(report.rss_start_kib, report.rss_end_kib))
    if report.http_status:
        lines.append("  HTTP answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(report.http_status.items())))
    lines.append(f"  reconcile of the run: {len(report.drift)} drift row(s)")
    lines += [f"    {row}" for row in report.drift[:20]]
    lines += [f"  reconcile note: {note}" for note in report.reconcile_notes]
    lines += [f"  note: {note}" for note in report.notes]
    problems = verdict(report)
    if report.lost_request_ids:
        lines.append("  lost: " + ", ".join(report.lost_request_ids[:20]))
    lines.append("")
    lines.append("  PASSED" if not problems else "  FAILED: " + "; ".join(problems))
    return "\n".join(lines)
