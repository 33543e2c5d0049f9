"""Fault-test support: stop/start the machine's services, a bounded load generator, the invariant checker.

The invariant (DESIGN.md section 5), checked against Postgres at the end of every fault test:
each accepted request_id (a 202 from the gateway) reaches exactly one terminal state (its
``inference_requests`` row is terminal AND ``event_store`` holds exactly one terminal event for it),
its tokens are charged exactly once (one ``token_usage`` row per completed request, none for the
others; the Redis "used" counter of each user equals the ledger's sum), and nothing accepted is lost.
Then ``mlp reconcile``'s checks of the namespace: the read models and daily aggregates equal the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aio_pika
import asyncpg
import httpx
import pytest
import redis

from events.status import TERMINAL_STATUSES
from mlp.cache import create_redis
from mlp.settings import Settings
from ops import reconcile
from quota.ledger import QuotaKeys
from quota.plans import day_window
from tests.support.isolation import Namespace
from tests.support.services import Platform

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
TERMINAL_TYPES: Final = ("InferenceCompleted", "InferenceFailed", "InferenceRejected")
# A user of the free plan may send 60 requests a minute: fault loads run on a bigger plan.
LOAD_PLAN: Final = "enterprise"
SERVICE_COMMAND_TIMEOUT_S: Final = 120

# --- the machine's services (DESIGN.md section 6) --------------------------------------------------


def _run(argv: Sequence[str], timeout_s: float = SERVICE_COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)


def _wait_for(probe: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f}s")


def _postgres_version() -> str:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir() if p.is_dir())
    return versions[-1]


def postgres_up() -> bool:
    return _run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], 10).returncode == 0


def stop_postgres() -> None:
    _run(["pg_ctlcluster", "--skip-systemctl-redirect", _postgres_version(), "main", "stop", "-m", "fast"])


def start_postgres() -> None:
    _run(["pg_ctlcluster", "--skip-systemctl-redirect", _postgres_version(), "main", "start"])
    _wait_for(postgres_up, "PostgreSQL")


def redis_up() -> bool:
    result = _run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "ping"], 10)
    return "PONG" in result.stdout


def stop_redis() -> None:
    # nosave: Redis keeps nothing on disk here, so a restart loses every key (as in production).
    _run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], 30)
    _wait_for(lambda: not redis_up(), "Redis shutdown", 30)


def start_redis() -> None:
    Path("/var/lib/redis").mkdir(parents=True, exist_ok=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    _run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ]
    )
    _wait_for(redis_up, "Redis")


def rabbitmq_up() -> bool:
    return _run(["rabbitmq-diagnostics", "-q", "check_port_connectivity"], 60).returncode == 0


def stop_rabbitmq() -> None:
    # stop_app keeps the Erlang node (and its vhosts, durable queues and persistent messages).
    _run(["rabbitmqctl", "-q", "stop_app"])


def start_rabbitmq() -> None:
    if _run(["rabbitmqctl", "-q", "start_app"]).returncode != 0:
        ensure_services()
    _wait_for(rabbitmq_up, "RabbitMQ", 120)


def ensure_services() -> None:
    """Start whichever of PostgreSQL, Redis and RabbitMQ is down (scripts/ensure-services)."""
    result = _run([str(REPO_ROOT / "scripts" / "ensure-services")], 300)
    if result.returncode != 0:
        raise RuntimeError(f"ensure-services failed:\n{result.stdout}\n{result.stderr}")


@contextlib.contextmanager
def outage(stop: Callable[[], None], start: Callable[[], None]) -> Iterator[Callable[[], None]]:
    """Stop a machine service for the block; it is ALWAYS started again (and every service checked).

    Yields ``restore``: call it to end the outage early inside the block (idempotent).
    """
    restored = False

    def restore() -> None:
        nonlocal restored
        if not restored:
            restored = True
            start()

    stop()
    try:
        yield restore
    finally:
        try:
            restore()
        finally:
            ensure_services()


# --- load ---------------------------------------------------------------------------------------


def users_of(label: str, count: int) -> list[str]:
    return [f"{label}-u{i}" for i in range(count)]


async def grant_plan(dsn: str, users: Iterable[str], plan: str = LOAD_PLAN) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO user_quotas (user_id, plan) VALUES ($1, $2) ON CONFLICT (user_id) DO UPDATE SET plan = $2",
            [(u, plan) for u in users],
        )
    finally:
        await conn.close()


@dataclass
class Submissions:
    """What the gateway answered: accepted request ids (with their user) and the refusals by code."""

    submitted: int = 0
    accepted: dict[str, str] = field(default_factory=dict)  # request_id -> user_id
    refused: Counter[str] = field(default_factory=Counter)  # "503", "429", "connect", ...

    @property
    def rejected(self) -> int:
        return sum(self.refused.values())

    def merge(self, other: Submissions) -> Submissions:
        merged = Submissions(self.submitted + other.submitted, {**self.accepted, **other.accepted})
        merged.refused = self.refused + other.refused
        return merged


def request_body(user_id: str, i: int, model: str = "basic-model", max_tokens: int = 16) -> dict[str, Any]:
    return {"prompt": f"fault test prompt number {i}", "user_id": user_id, "model": model, "max_tokens": max_tokens}


async def submit_one(client: httpx.AsyncClient, gateway_url: str, body: Mapping[str, Any], into: Submissions) -> int:
    """POST one request; records the answer; returns the HTTP status (0 when the gateway was unreachable)."""
    into.submitted += 1
    try:
        response = await client.post(f"{gateway_url}/api/v1/inference", json=dict(body))
    except httpx.HTTPError as exc:
        into.refused[f"unreachable:{type(exc).__name__}"] += 1
        return 0
    if response.status_code == 202:
        into.accepted[response.json()["request_id"]] = str(body["user_id"])
    else:
        into.refused[str(response.status_code)] += 1
    return response.status_code


async def submit_batch(
    gateway_url: str,
    count: int,
    users: Sequence[str],
    *,
    model: str = "basic-model",
    concurrency: int = 16,
    into: Submissions | None = None,
) -> Submissions:
    """``count`` requests spread over ``users``, at most ``concurrency`` at a time."""
    result = into if into is not None else Submissions()
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=15.0) as client:

        async def one(i: int) -> None:
            async with limit:
                await submit_one(client, gateway_url, request_body(users[i % len(users)], i, model), result)

        await asyncio.gather(*(one(i) for i in range(count)))
    return result


class SteadyLoad:
    """Submits requests at a steady pace in the background until stopped or ``max_requests`` were sent."""

    def __init__(
        self,
        gateway_url: str,
        users: Sequence[str],
        *,
        rate_per_s: float,
        max_requests: int,
        model: str = "basic-model",
    ) -> None:
        self._gateway_url = gateway_url
        self._users = users
        self._interval_s = 1.0 / rate_per_s
        self._max = max_requests
        self._model = model
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.result = Submissions()

    async def __aenter__(self) -> SteadyLoad:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> Submissions:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.result

    async def _run(self) -> None:
        pending: set[asyncio.Task[int]] = set()
        async with httpx.AsyncClient(timeout=15.0) as client:
            for i in range(self._max):
                if self._stop.is_set():
                    break
                body = request_body(self._users[i % len(self._users)], i, self._model)
                task = asyncio.create_task(submit_one(client, self._gateway_url, body, self.result))
                pending.add(task)
                task.add_done_callback(pending.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._interval_s)
            if pending:
                await asyncio.gather(*pending)


# --- observing the platform ------------------------------------------------------------------------


async def wait_terminal(dsn: str, request_ids: Iterable[str], timeout_s: float = 120.0) -> int:
    """Poll Postgres until every request is terminal or the time is up; returns how many are terminal."""
    ids = list(request_ids)
    deadline = time.monotonic() + timeout_s
    done = 0
    while True:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                done = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM inference_requests"
                        " WHERE request_id = ANY($1::text[]) AND status = ANY($2)",
                        ids,
                        list(TERMINAL_STATUSES),
                    )
                )
            finally:
                await conn.close()
        if done == len(ids) or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.5)


async def count_statuses(dsn: str, request_ids: Iterable[str]) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM inference_requests WHERE request_id = ANY($1::text[]) GROUP BY status",
            list(request_ids),
        )
    finally:
        await conn.close()
    return Counter({r["status"]: int(r["n"]) for r in rows})


async def queue_depth(rabbitmq_url: str, queue: str) -> int:
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def wait_queue_depth(rabbitmq_url: str, queue: str, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        depth = await queue_depth(rabbitmq_url, queue)
        if depth >= at_least or time.monotonic() > deadline:
            return depth
        await asyncio.sleep(0.2)


async def error_codes(dsn: str, request_ids: Iterable[str]) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT coalesce(error_code, reject_reason, status) AS code, count(*) AS n FROM inference_requests "
            "WHERE request_id = ANY($1::text[]) GROUP BY 1",
            list(request_ids),
        )
    finally:
        await conn.close()
    return Counter({r["code"]: int(r["n"]) for r in rows})


# --- the invariant ---------------------------------------------------------------------------------

_PER_REQUEST = """
SELECT ids.request_id,
       r.status,
       (SELECT count(*) FROM event_store e
         WHERE e.request_id = ids.request_id AND e.type = ANY($2::text[])) AS outcomes,
       (SELECT min(e.type) FROM event_store e
         WHERE e.request_id = ids.request_id AND e.type = ANY($2::text[])) AS outcome_type,
       (SELECT (e.payload->>'prompt_tokens')::int + (e.payload->>'completion_tokens')::int FROM event_store e
         WHERE e.request_id = ids.request_id AND e.type = 'InferenceCompleted') AS event_tokens,
       (SELECT count(*) FROM token_usage u WHERE u.request_id = ids.request_id) AS charges,
       (SELECT sum(u.total_tokens) FROM token_usage u WHERE u.request_id = ids.request_id) AS charged_tokens
FROM unnest($1::text[]) AS ids(request_id)
LEFT JOIN inference_requests r ON r.request_id = ids.request_id
"""

_STATUS_OF_TYPE: Final = {
    "InferenceCompleted": "completed",
    "InferenceFailed": "failed",
    "InferenceRejected": "rejected",
}


@dataclass
class InvariantReport:
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    lost: list[str] = field(default_factory=list)  # accepted, not terminal (or unknown) at the end
    charged_twice: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # every breach, described
    quota: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (redis used, ledger sum)
    open_reservations: dict[str, int] = field(default_factory=dict)  # user -> tokens still reserved


async def check_invariant(
    namespace: Namespace, accepted: Mapping[str, str], *, api_url: str | None = None, users: Iterable[str] = ()
) -> InvariantReport:
    """Check the invariant for ``accepted`` (request_id -> user_id); ``users`` adds users to the quota check."""
    report = InvariantReport()
    conn = await asyncpg.connect(namespace.postgres_dsn)
    try:
        rows = await conn.fetch(_PER_REQUEST, list(accepted), list(TERMINAL_TYPES))
        day = day_window(datetime.now(UTC))
        quota_users = sorted({*accepted.values(), *users})
        ledger = {
            r["user_id"]: int(r["tokens"])
            for r in await conn.fetch(
                "SELECT user_id, sum(total_tokens) AS tokens FROM token_usage "
                "WHERE user_id = ANY($1::text[]) AND occurred_at >= $2 AND occurred_at < $3 GROUP BY user_id",
                quota_users,
                day.starts_at,
                day.resets_at,
            )
        }
    finally:
        await conn.close()
    for row in rows:
        _check_request(row, report)
    await _check_quota(namespace, quota_users, ledger, day.id, api_url, report)
    await _check_books(namespace, report)
    return report


def _check_request(row: asyncpg.Record, report: InvariantReport) -> None:
    rid, status, outcomes = row["request_id"], row["status"], int(row["outcomes"])
    if status not in TERMINAL_STATUSES:
        report.lost.append(rid)
        report.violations.append(f"{rid}: status {status or 'unknown'} (not terminal)")
        return
    if outcomes != 1:
        report.violations.append(f"{rid}: {outcomes} terminal events in the event store")
    elif _STATUS_OF_TYPE[row["outcome_type"]] != status:
        report.violations.append(f"{rid}: status {status} but the outcome event is {row['outcome_type']}")
    charges = int(row["charges"])
    if charges > 1:
        report.charged_twice.append(rid)
    match status:
        case "completed":
            report.completed += 1
            if charges != 1:
                report.violations.append(f"{rid}: completed with {charges} token_usage rows")
            elif row["charged_tokens"] != row["event_tokens"]:
                report.violations.append(f"{rid}: charged {row['charged_tokens']}, completed {row['event_tokens']}")
        case "failed" | "rejected":
            report.failed += status == "failed"
            report.rejected += status == "rejected"
            if charges != 0:
                report.violations.append(f"{rid}: {status} but charged ({charges} token_usage rows)")


async def _check_quota(
    namespace: Namespace,
    users: Sequence[str],
    ledger: Mapping[str, int],
    day_id: str,
    api_url: str | None,
    report: InvariantReport,
) -> None:
    keys = QuotaKeys(namespace.redis_prefix)
    client = redis.Redis.from_url(namespace.redis_url, decode_responses=True)
    try:
        if api_url is not None and not client.exists(keys.built):
            # After a Redis restart the counters are rebuilt on first use: let the read API do it.
            async with httpx.AsyncClient(timeout=30.0) as http:
                for user in users:
                    await http.get(f"{api_url}/api/v1/users/{user}/quota")
        built = bool(client.exists(keys.built))
        for user in users:
            used = int(client.get(keys.used_day(user, day_id)) or 0)
            report.quota[user] = (used, ledger.get(user, 0))
            reserved = int(client.get(keys.reserved_sum(user)) or 0)
            if reserved:
                report.open_reservations[user] = reserved
            if built and used != ledger.get(user, 0):
                report.violations.append(f"user {user}: Redis used {used} != ledger {ledger.get(user, 0)}")
            if not built and ledger.get(user, 0) and api_url is None:
                report.violations.append(f"user {user}: quota counters not rebuilt (no 'built' marker)")
    finally:
        client.close()


async def _check_books(namespace: Namespace, report: InvariantReport) -> None:
    """``mlp reconcile`` of the namespace (today, UTC): every stream has its one outcome, the read models
    equal a fresh projection of the events, the daily aggregates equal the ledger. Its Redis check is
    left to ``_check_quota``: a rebuild after a Redis restart may restore the hold of a request whose
    outcome was not projected yet, which then lasts until it expires (``open_reservations``)."""
    settings = Settings(
        environment="test",
        rabbitmq_url=namespace.rabbitmq_url,
        postgres_dsn=namespace.postgres_dsn,
        redis_url=namespace.redis_url,
        redis_prefix=namespace.redis_prefix,
    )
    conn = await asyncpg.connect(namespace.postgres_dsn)
    client = create_redis(settings, max_connections=2)
    try:
        window = reconcile.default_window(datetime.now(UTC))
        findings = await reconcile.check_settled(conn, client, settings, window, 1.0)
    finally:
        await client.aclose()
        await conn.close()
    report.violations += [
        f"reconcile: {d.check} {d.key}: expected {d.expected}, found {d.actual}"
        for d in findings.drift
        if d.check != "redis"
    ]


def assert_invariant(report: InvariantReport, platform: Platform | None = None) -> None:
    """Fail with the first violations and, given the ``platform``, what explains them: the namespace's queues
    (ready, unacked, consumers) and each service's distinct warnings and errors."""
    if not report.violations:
        return
    shown = report.violations[:15]
    more = len(report.violations) - len(shown)
    message = ["invariant violated:", *shown, *([f"... and {more} more"] if more else [])]
    if platform is not None:
        message += [
            "queues (name ready unacked consumers):",
            queue_stats(platform.namespace),
            platform.notable_log_lines(),
        ]
    raise AssertionError("\n".join(message))


def queue_stats(namespace: Namespace) -> str:
    """The namespace's queues as ``rabbitmqctl list_queues`` shows them, or why it could not be read."""
    try:
        result = _run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                namespace.name,
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
            30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"  (rabbitmqctl failed: {exc})"
    return "\n".join(f"  {line}" for line in (result.stdout or result.stderr).splitlines()[:30])


# --- the fault table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultRow:
    fault: str
    submitted: int
    accepted: int
    completed: int
    failed: int
    rejected: int
    lost: int
    charged_twice: int
    seconds: float
    notes: str = ""


class FaultTable:
    """Rows of the closing note's table, kept in a JSON file under the pytest tmp dir."""

    COLUMNS: Final = ("fault", "submitted", "accepted", "completed", "failed", "rejected", "lost", "charged_twice")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[FaultRow] = []

    def add(self, row: FaultRow) -> None:
        self.rows.append(row)
        self.path.write_text(json.dumps([asdict(r) for r in self.rows], indent=2))

    def record(
        self, fault: str, submissions: Submissions, report: InvariantReport, started: float, notes: str = ""
    ) -> FaultRow:
        row = FaultRow(
            fault=fault,
            submitted=submissions.submitted,
            accepted=len(submissions.accepted),
            completed=report.completed,
            failed=report.failed,
            rejected=report.rejected,
            lost=len(report.lost),
            charged_twice=len(report.charged_twice),
            seconds=round(time.monotonic() - started, 1),
            notes=notes,
        )
        self.add(row)
        return row

    def render(self) -> str:
        header = [*self.COLUMNS, "seconds", "notes"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            values = [str(getattr(row, c)) for c in self.COLUMNS] + [str(row.seconds), row.notes]
            lines.append("| " + " | ".join(values) + " |")
        return "\n".join(lines)


FAULT_TABLE_KEY: Final = pytest.StashKey[FaultTable]()
