"""``mlp status``: the platform's health on one screen (``--json`` for machines); exit 1 when unhealthy.

  services     each service's /readyz (its dependency checks) and version (mlp_build_info on /metrics)
  queues       depth (ready messages) and consumers of every work queue and DLQ (passive declares:
               no management plugin needed)
  projections  events waiting for the collector, how long ago it last stored one, the lag gauge
  quota        whether the Redis counters are built from the ledger, or being rebuilt
  Triton       ready, the served models' state and batch sizes (configured, and observed by Triton)
  last 5 min   outcomes from the event store: completed, failed, rejected, the failure ratio

Critical problems (a service or Triton not ready, a work queue without consumers, the projections
stalled, a served model not loaded, failures over 5%) make the exit status 1, so the command can gate
a deploy; warnings (dead letters, lag, a quota rebuild) are shown only. Exit 2: bad arguments.
Replica counts in Kubernetes are the Deployments' (`kubectl get deploy -n mlp`): this command reads
what every process answers itself, wherever it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TextIO
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from events.model import TERMINAL_EVENTS
from events.topology import DLQ_SUFFIX, PROJECTIONS_QUEUE, WEBHOOKS_QUEUE, all_queues
from mlp.cache import create_redis
from mlp.settings import Settings, get_settings
from quota.ledger import QuotaKeys

EXIT_OK, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
HTTP_TIMEOUT_S: Final = 3.0
# The projections are stalled when events wait and none was stored for this long.
STALLED_AFTER_S: Final = 30.0
LAG_WARNING_S: Final = 30.0
# As the alert MlpFailureRatioHigh: over 5% failed, of at least 20 outcomes.
FAILURE_RATIO: Final = 0.05
MIN_OUTCOMES: Final = 20
ERROR_WINDOW_S: Final = 300
# Newest event-store rows looked at for the error rates (an index scan; the window shrinks past it).
ERROR_SCAN_ROWS: Final = 100_000

Severity = Literal["critical", "warning"]
# A service listening on every interface is reached on this machine.
_WILDCARD_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104


@dataclass(frozen=True)
class Problem:
    severity: Severity
    what: str


@dataclass(frozen=True)
class ServiceState:
    name: str
    url: str
    reachable: bool
    ready: bool
    version: str | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # the few samples status reads


@dataclass(frozen=True)
class QueueState:
    name: str
    exists: bool
    messages: int = 0  # ready (not yet delivered) messages
    consumers: int = 0

    @property
    def dead_letters(self) -> bool:
        return self.name.endswith(DLQ_SUFFIX)


@dataclass(frozen=True)
class ProjectionState:
    backlog: int | None  # events waiting in mlp.projections; None when RabbitMQ did not answer
    consumers: int | None
    last_stored_age_s: float | None  # since the newest event was stored; None: the store is empty
    lag_s: float | None  # the collector's gauge: now - occurred_at of the last projected event

    @property
    def stalled(self) -> bool:
        if not self.backlog:
            return False
        return self.consumers == 0 or self.last_stored_age_s is None or self.last_stored_age_s > STALLED_AFTER_S


@dataclass(frozen=True)
class QuotaState:
    reachable: bool
    built_at: str | None = None  # None: not built (the next request rebuilds the counters)
    rebuilding: bool = False
    error: str = ""


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str  # Triton's (READY, UNAVAILABLE, ...), or MISSING when not in its repository
    version: str = ""
    max_batch_size: int | None = None
    preferred_batch_sizes: list[int] = field(default_factory=list)
    mean_batch_size: float | None = None  # requests / executions since Triton started


@dataclass(frozen=True)
class TritonState:
    url: str
    ready: bool
    models: list[ModelState] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class Outcomes:
    window_s: float
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    expired: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.completed + self.failed + self.rejected + self.cancelled + self.expired

    @property
    def failure_ratio(self) -> float | None:
        return self.failed / self.total if self.total else None


@dataclass(frozen=True)
class Status:
    at: datetime
    services: list[ServiceState]
    queues: list[QueueState]
    projections: ProjectionState
    quota: QuotaState
    triton: TritonState
    outcomes: Outcomes | None
    database_error: str = ""
    broker_error: str = ""

    def problems(self) -> list[Problem]:
        return assess(self)


# --- deciding -------------------------------------------------------------------------------------


def assess(status: Status) -> list[Problem]:
    """What is wrong, critical first. Pure: every fact was read before."""
    found: list[Problem] = []
    for s in status.services:
        if not s.reachable:
            found.append(Problem("critical", f"{s.name} unreachable at {s.url} ({s.error})"))
        elif not s.ready:
            failing = ", ".join(name for name, ok in s.checks.items() if not ok) or "not ready"
            found.append(Problem("critical", f"{s.name} not ready ({failing})"))
        elif not all(s.checks.values()):  # ready on a fallback (mlp.health: a degradable dependency is down)
            degraded = ", ".join(name for name, ok in s.checks.items() if not ok)
            found.append(Problem("warning", f"{s.name} degraded ({degraded} down; serving on its fallback)"))
    if status.broker_error:
        found.append(Problem("critical", f"RabbitMQ: {status.broker_error}"))
    if status.database_error:
        found.append(Problem("critical", f"Postgres: {status.database_error}"))
    p = status.projections
    for q in status.queues:
        if q.name == PROJECTIONS_QUEUE and p.stalled:
            continue  # the stall below says it, with the time since the last stored event
        if not q.exists:
            found.append(Problem("critical", f"queue {q.name} does not exist (nothing declared the topology)"))
        elif q.dead_letters and q.messages:
            found.append(Problem("warning", f"{q.messages} dead-lettered message(s) in {q.name} (mlp dlq list)"))
        elif not q.dead_letters and q.consumers == 0 and q.name == WEBHOOKS_QUEUE and not q.messages:
            continue  # bound by the dispatcher alone: empty and unconsumed, webhooks are not in use (yet)
        elif not q.dead_letters and q.consumers == 0:
            found.append(Problem("critical", f"queue {q.name} has no consumer ({q.messages} message(s) waiting)"))
    if p.stalled:
        since = "never" if p.last_stored_age_s is None else f"{p.last_stored_age_s:.0f} s ago"
        found.append(Problem("critical", f"projections stalled: {p.backlog} event(s) waiting, last stored {since}"))
    elif p.lag_s is not None and p.lag_s > LAG_WARNING_S:
        found.append(Problem("warning", f"projection lag {p.lag_s:.1f} s (the last projected event)"))
    if not status.quota.reachable:
        found.append(Problem("critical", f"Redis: {status.quota.error}"))
    elif status.quota.rebuilding:
        found.append(Problem("warning", "the quota counters are being rebuilt from the ledger"))
    t = status.triton
    if not t.ready:
        found.append(Problem("critical", f"Triton not ready at {t.url}" + (f" ({t.error})" if t.error else "")))
    for m in t.models if not t.error else ():  # unreachable: the line above says it all
        if m.state != "READY":
            found.append(Problem("critical", f"model {m.name} is {m.state} in Triton"))
    o = status.outcomes
    if o is not None and o.total >= MIN_OUTCOMES and (o.failure_ratio or 0) > FAILURE_RATIO:
        found.append(Problem("critical", f"{o.failure_ratio:.1%} of the last {o.total} outcomes failed"))
    return sorted(found, key=lambda problem: problem.severity != "critical")


def healthy(problems: Sequence[Problem]) -> bool:
    return not any(p.severity == "critical" for p in problems)


# --- reading --------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


async def read_service(client: httpx.AsyncClient, name: str, base_url: str) -> ServiceState:
    base = base_url.rstrip("/")
    try:
        ready = await client.get(f"{base}/readyz")
        metrics = await client.get(f"{base}/metrics")
    except httpx.HTTPError as exc:
        return ServiceState(name, base, reachable=False, ready=False, error=f"{type(exc).__name__}: {exc}")
    body: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        body = ready.json()
    samples = _samples(metrics.text) if metrics.status_code == 200 else {}
    version = next((labels.get("version") for labels, _ in samples.get("mlp_build_info", [])), None)
    picked = {n: v for n in ("mlp_projection_lag_seconds",) for _, v in samples.get(n, [])}
    checks = {str(k): bool(v) for k, v in dict(body.get("checks", {})).items()}
    return ServiceState(name, base, True, ready.status_code == 200, version, checks, metrics=picked)


async def read_queues(settings: Settings) -> tuple[list[QueueState], str]:
    """Depth and consumers by passive declares (a missing queue closes its channel: one channel each)."""
    try:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=5)
    except Exception as exc:  # connection refused, auth, timeouts: reported, not raised
        return [], f"{type(exc).__name__}: {exc}"
    states: list[QueueState] = []
    try:
        for spec in all_queues(settings.models):
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(spec.name, passive=True)
                result = queue.declaration_result
                states.append(QueueState(spec.name, True, result.message_count or 0, result.consumer_count or 0))
            except aio_pika.exceptions.ChannelClosed:
                states.append(QueueState(spec.name, False))
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return states, ""


_TERMINAL_TYPES: Final = tuple(t.__name__ for t in TERMINAL_EVENTS)
_STATUS_OF_TYPE: Final = {
    "InferenceCompleted": "completed",
    "InferenceFailed": "failed",
    "InferenceRejected": "rejected",
    "InferenceCancelled": "cancelled",
    "InferenceExpired": "expired",
}


_OUTCOMES_SQL: Final = """
SELECT type, coalesce(payload->>'error_code', payload->>'reason') AS code, count(*) AS n
FROM (SELECT type, payload, recorded_at FROM event_store ORDER BY position DESC LIMIT $3) AS newest
WHERE recorded_at > $1 AND type = ANY($2::text[])
GROUP BY 1, 2
"""
_SCANNED_SQL: Final = """
SELECT count(*) AS scanned, min(recorded_at) AS oldest
FROM (SELECT recorded_at FROM event_store ORDER BY position DESC LIMIT $1) AS newest
"""


def outcomes_of(rows: Sequence[Mapping[str, Any] | asyncpg.Record], window_s: float) -> Outcomes:
    """(event type, error code or reject reason, count) rows -> the outcome counts."""
    counts = dict.fromkeys(_STATUS_OF_TYPE.values(), 0)
    codes: dict[str, int] = {}
    for r in rows:
        status = _STATUS_OF_TYPE.get(r["type"])
        if status is None:
            continue
        counts[status] += int(r["n"])
        if r["code"]:
            codes[f"{status}:{r['code']}"] = codes.get(f"{status}:{r['code']}", 0) + int(r["n"])
    return Outcomes(window_s, error_codes=codes, **counts)


async def read_database(settings: Settings, now: datetime) -> tuple[float | None, Outcomes | None, str]:
    """(seconds since the newest event was stored, the last 5 minutes' outcomes, error). The newest rows
    are read backwards by position (the primary key): no scan of the whole store."""
    since = now - timedelta(seconds=ERROR_WINDOW_S)
    try:
        conn = await asyncpg.connect(settings.postgres_dsn, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            newest = await conn.fetchval("SELECT recorded_at FROM event_store ORDER BY position DESC LIMIT 1")
            rows = await conn.fetch(_OUTCOMES_SQL, since, list(_TERMINAL_TYPES), ERROR_SCAN_ROWS)
            scanned = await conn.fetchrow(_SCANNED_SQL, ERROR_SCAN_ROWS)
    except (OSError, asyncpg.PostgresError) as exc:
        return None, None, f"{type(exc).__name__}: {exc}"
    finally:
        await conn.close()
    window = float(ERROR_WINDOW_S)
    if scanned is not None and scanned["scanned"] >= ERROR_SCAN_ROWS and scanned["oldest"] > since:
        window = (now - scanned["oldest"]).total_seconds()  # busier than the scan: the window it covered
    age = None if newest is None else max(0.0, (now - newest).total_seconds())
    return age, outcomes_of(rows, window), ""


async def read_quota(settings: Settings) -> QuotaState:
    keys = QuotaKeys(settings.redis_prefix)
    client = create_redis(settings, max_connections=2)
    try:
        built, locked = await client.get(keys.built), await client.exists(keys.lock)
    except Exception as exc:  # redis-py's connection and timeout errors
        return QuotaState(False, error=f"{type(exc).__name__}: {exc}")
    finally:
        await client.aclose()
    return QuotaState(True, None if built is None else str(built), bool(locked))


async def read_triton(client: httpx.AsyncClient, http_url: str, metrics_url: str, models: Sequence[str]) -> TritonState:
    base = http_url.rstrip("/")
    try:
        ready = (await client.get(f"{base}/v2/health/ready")).status_code == 200
        index = (await client.post(f"{base}/v2/repository/index", json={})).json()
    except (httpx.HTTPError, ValueError) as exc:
        return TritonState(base, False, [ModelState(m, "UNKNOWN") for m in models], f"{type(exc).__name__}: {exc}")
    states = {str(m["name"]): m for m in index if isinstance(m, Mapping) and "name" in m}
    batches: dict[str, tuple[float, float]] = {}
    with contextlib.suppress(httpx.HTTPError):
        samples = _samples((await client.get(metrics_url)).text)
        for name, slot in (("nv_inference_count", 0), ("nv_inference_exec_count", 1)):
            # Triton's counters lack the _total suffix; the parser adds it to their samples
            for labels, value in samples.get(name, []) + samples.get(name + "_total", []):
                seen = list(batches.get(labels.get("model", ""), (0.0, 0.0)))
                seen[slot] += value
                batches[labels.get("model", "")] = (seen[0], seen[1])
    found: list[ModelState] = []
    for name in models:
        entry = states.get(name)
        if entry is None:
            found.append(ModelState(name, "MISSING"))
            continue
        config: dict[str, Any] = {}
        with contextlib.suppress(httpx.HTTPError, ValueError):
            config = (await client.get(f"{base}/v2/models/{name}/config")).json()
        requests, executions = batches.get(name, (0.0, 0.0))
        found.append(
            ModelState(
                name,
                str(entry.get("state") or "UNKNOWN"),
                str(entry.get("version") or ""),
                config.get("max_batch_size"),
                list(config.get("dynamic_batching", {}).get("preferred_batch_size", [])),
                requests / executions if executions else None,
            )
        )
    return TritonState(base, ready, found)


@dataclass(frozen=True)
class Targets:
    """Where the services answer (flags, else the settings; a wildcard host means this machine)."""

    services: list[tuple[str, str]]
    triton_http: str
    triton_metrics: str

    @classmethod
    def of(cls, settings: Settings, args: argparse.Namespace) -> Targets:
        def url(host: str, port: int) -> str:
            return f"http://{'127.0.0.1' if host in _WILDCARD_HOSTS else host}:{port}"

        triton_host = urlsplit(f"//{settings.triton_url}").hostname or "127.0.0.1"
        workers = args.worker or [url(settings.health_host, settings.worker_health_port)]
        return cls(
            services=[
                ("gateway", args.gateway or url(settings.gateway_host, settings.gateway_port)),
                ("read-api", args.api or url(settings.read_api_host, settings.read_api_port)),
                ("collector", args.collector or url(settings.health_host, settings.collector_health_port)),
                *((f"worker{'' if len(workers) == 1 else f' {i + 1}'}", w) for i, w in enumerate(workers)),
            ],
            triton_http=args.triton_http or url(triton_host, settings.triton_http_port),
            triton_metrics=args.triton_metrics or url(triton_host, settings.triton_metrics_port) + "/metrics",
        )


async def gather_status(settings: Settings, targets: Targets) -> Status:
    now = datetime.now(UTC)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        services, triton, (queues, broker_error), (age, outcomes, db_error), quota = await asyncio.gather(
            asyncio.gather(*(read_service(client, name, url) for name, url in targets.services)),
            read_triton(client, targets.triton_http, targets.triton_metrics, settings.models),
            read_queues(settings),
            read_database(settings, now),
            read_quota(settings),
        )
    projections_queue = next((q for q in queues if q.name == PROJECTIONS_QUEUE), None)
    # Every process exports the gauge (mlp.metrics), only the collectors set it.
    lags = [
        s.metrics["mlp_projection_lag_seconds"]
        for s in services
        if s.name.startswith("collector") and "mlp_projection_lag_seconds" in s.metrics
    ]
    projections = ProjectionState(
        backlog=projections_queue.messages if projections_queue and projections_queue.exists else None,
        consumers=projections_queue.consumers if projections_queue and projections_queue.exists else None,
        last_stored_age_s=age,
        lag_s=max(lags) if lags else None,
    )
    return Status(now, list(services), queues, projections, quota, triton, outcomes, db_error, broker_error)


# --- showing --------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]


def render(status: Status, problems: Sequence[Problem]) -> str:
    verdict = "HEALTHY" if healthy(problems) else "UNHEALTHY"
    counts = {s: sum(p.severity == s for p in problems) for s in ("critical", "warning")}
    lines = [
        f"mlp status  {status.at.isoformat(timespec='seconds')}  {verdict}"
        f"  ({counts['critical']} critical, {counts['warning']} warning)",
        "",
    ]
    lines += _table(
        ("SERVICE", "READY", "VERSION", "CHECKS", "URL"),
        [
            (
                s.name,
                "yes" if s.ready else ("no" if s.reachable else "unreachable"),
                s.version or "-",
                " ".join(f"{k}{'' if ok else '!'}" for k, ok in s.checks.items()) or "-",
                s.url,
            )
            for s in status.services
        ],
    )
    lines.append("")
    lines += _table(
        ("QUEUE", "MESSAGES", "CONSUMERS"),
        [(q.name, str(q.messages) if q.exists else "missing", str(q.consumers)) for q in status.queues],
    )
    if status.broker_error:
        lines.append(f"(RabbitMQ: {status.broker_error})")
    p = status.projections
    stored = "never" if p.last_stored_age_s is None else f"{p.last_stored_age_s:.1f} s ago"
    lag = "-" if p.lag_s is None else f"{p.lag_s:.2f} s"
    backlog = "?" if p.backlog is None else str(p.backlog)
    lines += [
        "",
        f"projections  {backlog} event(s) waiting; last event stored {stored}; lag of the last projected {lag}",
    ]
    q = status.quota
    quota = (
        f"unreachable ({q.error})"
        if not q.reachable
        else ("counters not built (the next request rebuilds them)" if q.built_at is None else f"built {q.built_at}")
        + ("; REBUILDING" if q.rebuilding else "")
    )
    lines.append(f"quota        {quota}")
    t = status.triton
    lines.append(
        f"triton       {'ready' if t.ready else 'NOT READY'} at {t.url}" + (f" ({t.error})" if t.error else "")
    )
    for m in t.models:
        mean = "-" if m.mean_batch_size is None else f"{m.mean_batch_size:.2f}"
        most = "-" if m.max_batch_size is None else str(m.max_batch_size)
        lines.append(
            f"             {m.name} {m.state} v{m.version or '?'}: max batch {most},"
            f" preferred {m.preferred_batch_sizes or '-'}, mean executed {mean}"
        )
    o = status.outcomes
    if o is None:
        lines.append(f"last 5 min   unknown (Postgres: {status.database_error})")
    else:
        ratio = "-" if o.failure_ratio is None else f"{o.failure_ratio:.1%}"
        codes = ", ".join(f"{k} {v}" for k, v in sorted(o.error_codes.items()))
        lines.append(
            f"last {o.window_s / 60:.0f} min   completed {o.completed}, failed {o.failed}, rejected {o.rejected},"
            f" cancelled {o.cancelled}, expired {o.expired}; failure ratio {ratio}" + (f" ({codes})" if codes else "")
        )
    lines += ["", "problems" if problems else "no problems"]
    lines += [f"  {p.severity:<8}  {p.what}" for p in problems]
    return "\n".join(lines)


def as_json(status: Status, problems: Sequence[Problem]) -> dict[str, Any]:
    body = dataclasses.asdict(status)
    body["at"] = status.at.isoformat()
    body["healthy"] = healthy(problems)
    body["projections"]["stalled"] = status.projections.stalled
    if status.outcomes is not None:
        body["outcomes"]["failure_ratio"] = status.outcomes.failure_ratio
    body["problems"] = [dataclasses.asdict(p) for p in problems]
    return body


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlp status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--gateway", help="gateway base URL (default from MLP_GATEWAY_HOST/PORT)")
    parser.add_argument("--api", help="read API base URL (default from MLP_READ_API_HOST/PORT)")
    parser.add_argument(
        "--collector", help="collector health URL (default from MLP_HEALTH_HOST/MLP_COLLECTOR_HEALTH_PORT)"
    )
    parser.add_argument("--worker", action="append", help="a worker's health URL (repeatable; default from settings)")
    parser.add_argument(
        "--triton-http", help="Triton's HTTP URL (default: MLP_TRITON_URL's host, MLP_TRITON_HTTP_PORT)"
    )
    parser.add_argument("--triton-metrics", help="Triton's metrics URL (default: its host, MLP_TRITON_METRICS_PORT)")
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, settings: Settings | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = settings or get_settings()
    status = asyncio.run(gather_status(settings, Targets.of(settings, args)))
    problems = assess(status)
    out = out or sys.stdout
    out.write((json.dumps(as_json(status, problems), indent=2) if args.json else render(status, problems)) + "\n")
    return EXIT_OK if healthy(problems) else EXIT_UNHEALTHY
