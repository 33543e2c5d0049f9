"""Pure pieces of ``mlp bench``: percentiles, the report's shape, the ratios and the printed table.

Nothing here does I/O or reads a clock, so the numbers a run prints are a function of its samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles of one latency distribution, in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted samples, nearest-rank (no interpolation)."""
    if not ordered:
        return math.nan
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarize(seconds: Sequence[float]) -> Latency:
    """Percentiles of samples given in seconds; NaN everywhere when there are none."""
    ordered = sorted(seconds)
    if not ordered:
        return Latency(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    ms = 1000.0
    return Latency(
        count=len(ordered),
        p50_ms=percentile(ordered, 0.50) * ms,
        p90_ms=percentile(ordered, 0.90) * ms,
        p99_ms=percentile(ordered, 0.99) * ms,
        max_ms=ordered[-1] * ms,
        mean_ms=sum(ordered) / len(ordered) * ms,
    )


def per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each service present in both samples (seconds)."""
    if requests <= 0:
        return {}
    return {name: (after[name] - before[name]) * 1000.0 / requests for name in after if name in before}


# Labels of the shared data services in service_cpu_ms_per_request (ops.bench.spawn.DATA_SERVICES).
DATA_SERVICE_LABELS: Final = frozenset({"rabbitmq", "postgres", "redis"})


@dataclass(frozen=True, slots=True)
class Baseline:
    """One baseline (broker round trip or direct Triton) at one concurrency."""

    name: str
    concurrency: int
    requests: int
    errors: int
    per_second: float
    latency: Latency


@dataclass(frozen=True, slots=True)
class Counts:
    sent: int
    accepted: int
    rejected_http: int  # 429: quota refused at the gateway
    http_errors: int  # any other answer, or no answer at all
    completed: int
    failed: int
    rejected_events: int  # InferenceRejected: refused by the worker
    lost: int  # accepted, but no terminal event within the grace period
    http_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one ``mlp bench`` run measured; ``as_dict`` is the ``--json`` document."""

    mode: str  # "open-loop" or "closed-loop"
    target: str  # "rate 100/s" or "concurrency 32"
    duration_s: float
    user_id: str
    model: str
    machine: dict[str, Any]
    counts: Counts
    accepted_per_s: float
    completed_per_s: float
    gateway: Latency
    end_to_end: Latency
    baselines: list[Baseline]
    ratios: dict[str, float]
    lost_request_ids: list[str]
    notes: list[str] = field(default_factory=list)
    # --spawn only: CPU milliseconds each service spent per accepted request (load and drain)
    service_cpu_ms_per_request: dict[str, float] = field(default_factory=dict)
    # --spawn only: resident memory (KiB) of each service at the start and at the end of the load
    service_rss_kib_start: dict[str, int] = field(default_factory=dict)
    service_rss_kib_end: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = _finite(asdict(self))
        return document


def _finite(value: Any) -> Any:
    """JSON has no NaN: missing figures become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return numerator / denominator


def find_baseline(baselines: Sequence[Baseline], name: str, *, loaded: bool) -> Baseline | None:
    """The unloaded (concurrency 1) or the loaded (highest concurrency) run of one baseline."""
    runs = sorted((b for b in baselines if b.name == name), key=lambda b: b.concurrency)
    if not runs:
        return None
    return runs[-1] if loaded else runs[0]


# The services every request passes through (the read API and Triton are not counted).
PIPELINE_SERVICES: Final = ("gateway", "worker", "collector")


def compute_ratios(
    gateway: Latency,
    end_to_end: Latency,
    accepted_per_s: float,
    completed_per_s: float,
    baselines: Sequence[Baseline],
    cpu_ms_per_request: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Platform figures over the same run's baselines: the platform's cost, as a multiple.

    Latencies compare with the unloaded (concurrency 1) baselines: the floor a request could
    reach; throughputs compare with the loaded ones: the most the component delivered alone.
    With CPU figures (``--spawn``, RabbitMQ on this machine), the platform's own services' CPU per
    request over RabbitMQ's: at or below 1 the pipeline costs what the broker does.
    """
    ratios: dict[str, float] = {}
    triton_1 = find_baseline(baselines, "triton", loaded=False)
    triton_c = find_baseline(baselines, "triton", loaded=True)
    broker_1 = find_baseline(baselines, "broker", loaded=False)
    broker_c = find_baseline(baselines, "broker", loaded=True)
    if triton_1 is not None:
        ratios["e2e_p50_over_triton_p50"] = _ratio(end_to_end.p50_ms, triton_1.latency.p50_ms)
        ratios["e2e_p99_over_triton_p99"] = _ratio(end_to_end.p99_ms, triton_1.latency.p99_ms)
    if broker_1 is not None:
        ratios["e2e_p50_over_broker_rtt_p50"] = _ratio(end_to_end.p50_ms, broker_1.latency.p50_ms)
        ratios["gateway_p50_over_broker_rtt_p50"] = _ratio(gateway.p50_ms, broker_1.latency.p50_ms)
    if triton_c is not None:
        ratios["completed_rate_over_triton_rate"] = _ratio(completed_per_s, triton_c.per_second)
    if broker_c is not None:
        ratios["accepted_rate_over_broker_rate"] = _ratio(accepted_per_s, broker_c.per_second)
        ratios["completed_rate_over_broker_rate"] = _ratio(completed_per_s, broker_c.per_second)
    cpu = cpu_ms_per_request or {}
    if cpu.get("rabbitmq") and all(name in cpu for name in PIPELINE_SERVICES):
        ratios["pipeline_cpu_over_broker_cpu"] = _ratio(sum(cpu[n] for n in PIPELINE_SERVICES), cpu["rabbitmq"])
    return ratios


RATIO_LABELS: Mapping[str, str] = {
    "e2e_p50_over_triton_p50": "submit->terminal p50 / direct Triton p50 (c=1)",
    "e2e_p99_over_triton_p99": "submit->terminal p99 / direct Triton p99 (c=1)",
    "e2e_p50_over_broker_rtt_p50": "submit->terminal p50 / broker round trip p50 (c=1)",
    "gateway_p50_over_broker_rtt_p50": "gateway response p50 / broker round trip p50 (c=1)",
    "completed_rate_over_triton_rate": "completed/s / direct Triton req/s (loaded)",
    "accepted_rate_over_broker_rate": "accepted/s / broker round trips/s (loaded)",
    "completed_rate_over_broker_rate": "completed/s / broker round trips/s (loaded)",
    "pipeline_cpu_over_broker_cpu": "CPU/request: gateway+worker+collector / RabbitMQ",
}


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def render_rss(start: Mapping[str, int], end: Mapping[str, int]) -> str:
    """``gateway 81 -> 95 MiB, worker ...``: each service's RSS at the start and at the end."""
    names = sorted(set(start) | set(end))
    shown = []
    for name in names:
        before = _mib(start[name]) if name in start else "?"
        after = _mib(end[name]) if name in end else "?"
        shown.append(f"{name} {before} -> {after} MiB")
    return ", ".join(shown) if shown else "(no service measured)"


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:8.2f}"


def _latency_row(label: str, latency: Latency, rate: str) -> str:
    return (
        f"  {label:<34} {_ms(latency.p50_ms):>9} {_ms(latency.p90_ms):>9} {_ms(latency.p99_ms):>9}"
        f" {_ms(latency.max_ms):>9}  {rate}"
    )


def render_table(report: Report) -> str:
    """The human-readable summary ``mlp bench`` prints at the end."""
    c = report.counts
    machine = report.machine
    lines = [
        f"mlp bench: {report.mode} {report.target}, {report.duration_s:.1f} s, user {report.user_id}, "
        f"model {report.model}, {machine.get('cpus', '?')} CPUs ({machine.get('host', '?')})",
        "",
        f"  {'latency (ms)':<34} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}  throughput",
        _latency_row("gateway response (HTTP 202)", report.gateway, f"{report.accepted_per_s:9.1f} accepted/s"),
        _latency_row("submit -> terminal (event store)", report.end_to_end, f"{report.completed_per_s:9.1f} done/s"),
    ]
    for b in report.baselines:
        unit = "round trips/s" if b.name == "broker" else "req/s"
        label = f"baseline {b.name} (c={b.concurrency})"
        extra = f" ({b.errors} errors)" if b.errors else ""
        lines.append(_latency_row(label, b.latency, f"{b.per_second:9.1f} {unit}{extra}"))
    lines += [
        "",
        f"  requests: sent {c.sent}, accepted {c.accepted}, refused 429 {c.rejected_http}, "
        f"other HTTP errors {c.http_errors}",
        f"  outcomes: completed {c.completed}, failed {c.failed}, rejected {c.rejected_events}, LOST {c.lost}",
    ]
    if c.http_status:
        lines.append("  HTTP answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(c.http_status.items())))
    if report.service_cpu_ms_per_request:
        cpu = report.service_cpu_ms_per_request
        ours = {k: v for k, v in cpu.items() if k not in DATA_SERVICE_LABELS}
        theirs = {k: v for k, v in cpu.items() if k in DATA_SERVICE_LABELS}
        lines.append("  CPU per accepted request: " + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(ours.items())))
        if theirs:
            lines.append(
                "  CPU per accepted request, data services on this machine: "
                + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(theirs.items()))
            )
    if report.service_rss_kib_start or report.service_rss_kib_end:
        lines.append(
            "  RSS per service (start -> end of the load): "
            + render_rss(report.service_rss_kib_start, report.service_rss_kib_end)
        )
    if report.ratios:
        lines += ["", "  ratios (platform / baseline, same run)"]
        for key, value in report.ratios.items():
            shown = "-" if not math.isfinite(value) else f"{value:8.2f}x"
            lines.append(f"    {RATIO_LABELS.get(key, key):<52} {shown}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    if report.lost_request_ids:
        shown_ids = ", ".join(report.lost_request_ids[:20])
        more = len(report.lost_request_ids) - 20
        lines += ["", f"  FAILED: {c.lost} accepted requests never reached a terminal state: {shown_ids}"]
        if more > 0:
            lines.append(f"  ... and {more} more (all in --json)")
    return "\n".join(lines)
