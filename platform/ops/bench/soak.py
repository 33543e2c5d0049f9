"""``mlp bench --soak DURATION``: a steady open-loop load while a fault schedule runs, then the books.

  mlp bench --soak 10m                 50% of the capacity measured first (5 s closed loop, c=32)
  mlp bench --soak 60s --rate 20       a fixed rate

The soak needs to control the processes, so it runs the platform itself (``--soak`` implies
``--spawn``): the services of ``mlp up`` (collector, worker, read API, gateway, and a Triton of its
own unless MLP_TRITON_URL is set and answers) on free ports, and a PRIVATE ``redis-server`` on a free port
(MLP_REDIS_URL points the services at it), because restarting the machine's shared Redis would
hit everyone using it. ``mlp up`` stops everything when a child dies, so the soak supervises the
services itself: a killed worker is started again, as an orchestrator would.

The faults (``ops.bench.soak_plan.plan_faults``): kill -9 of the worker (then a new one is
started), a Redis restart (kill -9, started again empty on the same port: the services rebuild
their quota counters from the ledger), and a SIGSTOP of the collector for a few seconds (SIGCONT
after). At the end it waits for the stragglers and checks that every accepted request reached
exactly one terminal state in the event store, that each completed request is charged exactly
once in ``token_usage``, that the soak user's Redis day counter equals the ledger's sum with no
reservation left, and that `mlp reconcile` of the window finds no drift. It reports each
service's RSS at the start and at the end of the load. Exit 1 when any of that fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Final, TextIO

import aiohttp
import asyncpg
import msgspec
import redis.asyncio as redis

from mlp.cache import create_redis
from mlp.settings import Settings
from ops import reconcile
from ops.bench.load import LoadPlan, LoadRunner, encode_body, new_session
from ops.bench.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Progress, raise_quota, warm_up
from ops.bench.soak_plan import (
    Charges,
    Fault,
    Injected,
    SoakReport,
    capacity,
    plan_faults,
    render_soak,
    soak_rate,
    verdict,
)
from ops.bench.spawn import free_ports, rss_kib, spawn_env, triton_pid
from ops.bench.terminal import TERMINAL_TYPES, TerminalTracker
from ops.rabbitmq_policy import PolicyError, apply_requests_bound
from ops.up import plan as up_plan
from ops.up import stop_process
from projections.migrate import migrate
from quota.ledger import QuotaKeys
from quota.plans import day_window

# The capacity probe: a short closed-loop burst, then its outcomes.
PROBE_S: Final = 5.0
PROBE_CONCURRENCY: Final = 32
READY_TIMEOUT_S: Final = 120.0
TRITON_READY_TIMEOUT_S: Final = 300.0
# The services the soak runs, in mlp up's start order (the webhook dispatcher has no part in it).
SERVICES: Final = ("triton", "collector", "worker", "read-api", "gateway")


class SoakError(RuntimeError):
    """The soak could not set up (a service or the private Redis did not start)."""


@dataclass
class Service:
    """One supervised service process: started again by ``restart`` after a kill."""

    name: str
    argv: list[str]
    ready_url: str
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    async def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} of {self.name} ---\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # its own process group: a kill reaches its children too
            )
        self.starts += 1
        await _wait_ready(self, timeout_s)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    async def kill(self) -> None:
        """kill -9 (its whole process group), and reap it."""
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        await self.process.wait()

    async def stop(self, grace_s: float) -> None:
        if self.process is not None:
            self.signal_group(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            await stop_process(self.process, signal.SIGTERM, grace_s)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


async def _wait_ready(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            assert service.process is not None
            if service.process.returncode is not None:
                raise SoakError(f"{service.name} exited with {service.process.returncode}:\n{_tail(service.log_path)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(service.ready_url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise SoakError(f"{service.name} not ready within {timeout_s:.0f}s:\n{_tail(service.log_path)}")
            await asyncio.sleep(0.3)


@dataclass
class PrivateRedis:
    """A ``redis-server`` of the soak's own, without persistence: a restart loses everything."""

    port: int
    log: IO[bytes]
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout_s: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SoakError("redis-server is not installed (the soak runs a private Redis it can restart)")
        self.process = await asyncio.create_subprocess_exec(
            binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--daemonize", "no"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self.log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.process.returncode is not None:
                    raise SoakError(f"the private redis-server exited with {self.process.returncode}")
                try:
                    if await client.ping():
                        return
                except (redis.RedisError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise SoakError(f"the private redis-server did not answer on port {self.port}")
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@dataclass
class SoakPlatform:
    settings: Settings  # as the services see it
    services: dict[str, Service]
    redis: PrivateRedis
    external_triton: bool
    logs: Path
    injected: list[Injected] = field(default_factory=list)

    @property
    def gateway_url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.settings.gateway_port}"

    def rss(self) -> dict[str, int]:
        pids = {name: pid for name, service in self.services.items() if (pid := service.pid) is not None}
        if self.external_triton:
            found = triton_pid(self.settings.triton_url)
            if found is not None:
                pids["triton"] = found
        return rss_kib(pids)


def soak_env(base: Mapping[str, str], redis_url: str, start_triton: bool) -> dict[str, str]:
    """The services' environment: free ports (as ``--spawn``), the private Redis, and Triton's ports
    when the soak starts its own Triton."""
    env = spawn_env(base)
    env["MLP_REDIS_URL"] = redis_url
    if start_triton:
        http, grpc, metrics = free_ports(3)
        env.update(
            MLP_TRITON_URL=f"127.0.0.1:{grpc}", MLP_TRITON_HTTP_PORT=str(http), MLP_TRITON_METRICS_PORT=str(metrics)
        )
    return env


def _triton_answers(settings: Settings) -> bool:
    host, _, port = settings.triton_url.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


@asynccontextmanager
async def soak_platform(base: Settings, base_env: Mapping[str, str], err: TextIO) -> AsyncIterator[SoakPlatform]:
    with tempfile.TemporaryDirectory(prefix="mlp-soak-") as tmp:
        logs = Path(tmp)
        (redis_port,) = free_ports(1)
        with (logs / "redis.log").open("ab") as redis_log:
            private = PrivateRedis(redis_port, redis_log)
            await private.start()
            services: dict[str, Service] = {}
            try:
                # A Triton of its own unless MLP_TRITON_URL names one that answers: on a shared machine
                # whatever happens to listen on the default port may be gone in a minute.
                start_triton = not (base_env.get("MLP_TRITON_URL") and _triton_answers(base))
                env = soak_env(base_env, private.url, start_triton)
                settings = soak_settings(base, env)
                env["MLP_MODELS"] = ",".join(settings.models)
                await migrate(settings.postgres_dsn)
                try:
                    apply_requests_bound(settings)
                except PolicyError as exc:
                    err.write(f"soak: the requests queues are not bounded: {exc}\n")
                for child in up_plan(settings, start_triton):
                    if child.name in SERVICES:
                        services[child.name] = Service(
                            child.name, child.argv, child.ready_url, env, logs / f"{child.name}.log"
                        )
                for service in services.values():
                    err.write(f"soak: starting {service.name} ...\n")
                    timeout = TRITON_READY_TIMEOUT_S if service.name == "triton" else READY_TIMEOUT_S
                    await service.start(timeout)
                yield SoakPlatform(settings, services, private, not start_triton, logs)
            finally:
                # mlp up's order: the gateway stops accepting first, the collector drains last, Triton after.
                for name in ("gateway", "read-api", "worker", "collector", "triton"):
                    if name in services:
                        await services[name].stop(base.graceful_timeout_s + 5)
                await private.kill()


# environment variable -> Settings field (an int), for every port the soak gives the services
_INT_FIELDS: Final = {
    "MLP_GATEWAY_PORT": "gateway_port",
    "MLP_READ_API_PORT": "read_api_port",
    "MLP_COLLECTOR_HEALTH_PORT": "collector_health_port",
    "MLP_WORKER_HEALTH_PORT": "worker_health_port",
    "MLP_TRITON_HTTP_PORT": "triton_http_port",
    "MLP_TRITON_METRICS_PORT": "triton_metrics_port",
}
_STR_FIELDS: Final = {"MLP_REDIS_URL": "redis_url", "MLP_TRITON_URL": "triton_url"}


def soak_settings(base: Settings, env: Mapping[str, str]) -> Settings:
    """``base`` as the services started with ``env`` (``soak_env``) see it."""
    update: dict[str, object] = {field: int(env[name]) for name, field in _INT_FIELDS.items() if name in env}
    update.update({field: env[name] for name, field in _STR_FIELDS.items() if name in env})
    return base.model_copy(update=update)


async def inject(platform: SoakPlatform, fault: Fault, at_s: float) -> Injected:
    started = time.monotonic()
    detail = ""
    if fault.kind == "kill_worker":
        worker = platform.services["worker"]
        old = worker.pid
        await worker.kill()
        await worker.start()
        detail = f"pid {old} -> {worker.pid}"
    elif fault.kind == "restart_redis":
        await platform.redis.kill()
        await platform.redis.start()
        detail = f"port {platform.redis.port}, empty"
    else:
        collector = platform.services["collector"]
        collector.signal_group(signal.SIGSTOP)
        try:
            await asyncio.sleep(fault.length_s)
        finally:
            collector.signal_group(signal.SIGCONT)
        detail = f"SIGSTOP for {fault.length_s:.1f} s"
    return Injected(fault.kind, round(at_s, 1), round(time.monotonic() - started, 1), detail)


async def run_faults(platform: SoakPlatform, faults: list[Fault], t0: float, err: TextIO) -> None:
    """The schedule, one fault after the other (a fault due while another runs starts late)."""
    for fault in faults:
        delay = t0 + fault.at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        injected = await inject(platform, fault, time.monotonic() - t0)
        platform.injected.append(injected)
        err.write(f"soak: {injected.at_s:6.1f}s {injected.kind} ({injected.detail}, {injected.took_s:.1f} s)\n")


async def measure_capacity(
    session: aiohttp.ClientSession, url: str, body: bytes, tracker: TerminalTracker, grace_s: float
) -> float:
    plan = LoadPlan(url=url, body=body, concurrency=PROBE_CONCURRENCY, duration_s=PROBE_S, connections=64)
    stats = await LoadRunner(session, plan, tracker.add).run()
    await tracker.wait_all(grace_s)
    done = [tracker.done[i] for i in stats.accepted_ids if i in tracker.done]
    last = max((t.recorded_at for t in done), default=None)
    completed = sum(1 for t in done if t.kind == "InferenceCompleted")
    return capacity(completed, stats.started_wall, last)


async def charges(pool: asyncpg.Pool, settings: Settings, user_id: str, tracker: TerminalTracker) -> Charges:
    completed = [rid for rid, t in tracker.done.items() if t.kind == "InferenceCompleted"]
    others = [rid for rid, t in tracker.done.items() if t.kind != "InferenceCompleted"]
    rows = await pool.fetch(
        "SELECT request_id, count(*) AS n FROM token_usage WHERE request_id = ANY($1::text[]) GROUP BY request_id",
        completed,
    )
    per_request = {r["request_id"]: int(r["n"]) for r in rows}
    charged_other = await pool.fetchval("SELECT count(*) FROM token_usage WHERE request_id = ANY($1::text[])", others)
    day = day_window(datetime.now(UTC))
    ledger = await pool.fetchval(
        "SELECT COALESCE(sum(total_tokens), 0)::bigint FROM token_usage"
        " WHERE user_id = $1 AND occurred_at >= $2 AND occurred_at < $3",
        user_id,
        day.starts_at,
        day.resets_at,
    )
    keys = QuotaKeys(settings.redis_prefix)
    client = create_redis(settings, max_connections=2)
    try:
        built = bool(await client.exists(keys.built))
        counter = await client.get(f"{keys.base}ud:{user_id}:{day.id}")
        now_ms = int(time.time() * 1000)
        live = [str(m) for m in await client.zrangebyscore(keys.reservations(user_id), f"({now_ms}", "+inf")]
        amounts = await client.hmget(keys.amounts(user_id), live) if live else []
    finally:
        await client.aclose()
    return Charges(
        completed=len(completed),
        charged_once=sum(1 for rid in completed if per_request.get(rid) == 1),
        uncharged=sum(1 for rid in completed if rid not in per_request),
        charged_not_completed=int(charged_other or 0),
        ledger_day_tokens=int(ledger or 0),
        redis_day_tokens=int(counter or 0) if built else None,
        open_reservations=sum(int(a or 0) for a in amounts),
    )


async def multi_terminal(pool: asyncpg.Pool, request_ids: list[str]) -> list[str]:
    rows = await pool.fetch(
        "SELECT request_id FROM event_store WHERE request_id = ANY($1::text[]) AND type = ANY($2::text[])"
        " GROUP BY request_id HAVING count(*) > 1",
        request_ids,
        list(TERMINAL_TYPES),
    )
    return sorted(r["request_id"] for r in rows)


async def settle_counters(
    pool: asyncpg.Pool, settings: Settings, user_id: str, tracker: TerminalTracker, timeout_s: float
) -> Charges:
    """The charges once the counter stopped moving and no reservation is open (or ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = await charges(pool, settings, user_id, tracker)
        if (not found.counter_excess and not found.open_reservations) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1.0)


def _write_json(path: Path, report: SoakReport) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report.as_dict()), indent=2) + b"\n")


async def soak(args: argparse.Namespace, base: Settings, out: TextIO, err: TextIO) -> int:
    """``mlp bench --soak``: returns the exit code (0 passed, 1 failed, 2 could not start)."""
    duration: float = args.soak
    json_path: Path | None = args.json
    faults = plan_faults(duration)
    started = datetime.now(UTC)
    err.write(f"soak: {duration:.0f} s, {len(faults)} faults planned; spawning the platform ...\n")
    try:
        async with soak_platform(base, os.environ, err) as platform:
            report = await _drive(platform, args, faults, started, err)
    except SoakError as exc:
        err.write(f"mlp bench --soak: could not run: {exc}\n")
        return EXIT_USAGE
    out.write(render_soak(report) + "\n")
    if json_path is not None:
        _write_json(json_path, report)
        err.write(f"report written to {json_path}\n")
    problems = verdict(report)
    if problems:
        err.write("mlp bench --soak: FAILED: " + "; ".join(problems) + "\n")
        return EXIT_FAILED
    return EXIT_OK


async def _drive(
    platform: SoakPlatform, args: argparse.Namespace, faults: list[Fault], started: datetime, err: TextIO
) -> SoakReport:
    settings = platform.settings
    duration: float = args.soak
    user: str = args.user
    grace: float = args.grace
    fixed_rate: float | None = args.rate
    quiet: bool = args.quiet
    body = encode_body(args.prompt, user, args.model, args.max_tokens)
    url = platform.gateway_url + "/api/v1/inference"
    notes: list[str] = []
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2, timeout=10)
    assert pool is not None
    try:
        await raise_quota(settings, user)
        tracker = TerminalTracker(pool)
        pooled = LoadPlan(url=url, body=body, rate=1.0, duration_s=duration, connections=64)
        async with new_session(pooled) as session:
            warm = LoadPlan(url=url, body=body, concurrency=4, requests=20)
            problem = await warm_up(session, warm, tracker, timeout_s=30.0)
            if problem:
                notes.append(problem)
            await tracker.wait_all(10.0)
            if fixed_rate is not None:
                rate, source = fixed_rate, "--rate"
            else:
                err.write(f"soak: measuring capacity ({PROBE_S:.0f} s closed loop at c={PROBE_CONCURRENCY}) ...\n")
                measured = await measure_capacity(session, url, body, tracker, grace)
                if measured <= 0:
                    raise SoakError("the capacity probe completed no request (is Triton serving the model?)")
                rate = soak_rate(measured)
                source = f"50% of measured capacity {measured:.0f} req/s"
            err.write(f"soak: open loop at {rate:g} req/s for {duration:.0f} s\n")
            before = set(tracker.done) | set(tracker.pending)
            plan = LoadPlan(url=url, body=body, rate=rate, duration_s=duration, connections=64)
            runner = LoadRunner(session, plan, tracker.add)
            rss_start = platform.rss()
            progress = Progress(lambda: runner.stats, lambda: len(tracker.done), err)

            async def tick() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    await tracker.poll(10_000)
                    if not quiet:
                        progress.show(progress.line())

            ticker = asyncio.create_task(tick())
            schedule = asyncio.create_task(run_faults(platform, faults, time.monotonic(), err))
            try:
                stats = await runner.run()
                await schedule  # the last fault is over before the load ends (plan_faults)
            finally:
                for task in (ticker, schedule):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                platform.services["collector"].signal_group(signal.SIGCONT)
                if not quiet:
                    progress.end()
            rss_end = platform.rss()
        err.write(f"soak: load done; waiting up to {grace:.0f}s for {len(tracker.pending)} outcomes ...\n")
        lost = await tracker.wait_all(grace)
        soaked = sorted(stats.accepted_ids - before)
        multi = await multi_terminal(pool, list(tracker.done))
        found = await settle_counters(pool, settings, user, tracker, timeout_s=min(grace, 30.0))
        drift, reconcile_notes = await _reconcile(settings, started, grace)
    finally:
        await pool.close()
    outcomes: dict[str, int] = {}
    for rid in soaked:
        if rid in tracker.done:
            kind = tracker.done[rid].kind
            outcomes[kind] = outcomes.get(kind, 0) + 1
    if stats.max_lag_s > 0.5:
        notes.append(f"the load generator fell up to {stats.max_lag_s * 1000:.0f} ms behind its timetable")
    return SoakReport(
        duration_s=stats.elapsed_s,
        rate=rate,
        rate_source=source,
        user_id=user,
        sent=stats.sent,
        accepted=stats.accepted,
        terminal=sum(outcomes.values()),
        outcomes=outcomes,
        lost_request_ids=sorted(lost),
        multi_terminal_ids=multi,
        charges=found,
        drift=drift,
        reconcile_notes=reconcile_notes,
        faults=list(platform.injected),
        rss_start_kib=rss_start,
        rss_end_kib=rss_end,
        http_status=dict(stats.status),
        notes=notes,
    )


async def _reconcile(settings: Settings, started: datetime, grace_s: float) -> tuple[list[str], list[str]]:
    """`mlp reconcile` of the run's window against the private Redis (drift confirmed by a second look)."""
    window = reconcile.Window(started, datetime.now(UTC) + timedelta(seconds=1))
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    client = create_redis(settings, max_connections=4)
    try:
        findings = await reconcile.check_settled(conn, client, settings, window, 2.0, grace_s=grace_s)
    finally:
        await client.aclose()
        await conn.close()
    rows = [f"{d.check} {d.key}: expected {d.expected}, found {d.actual}" for d in findings.drift]
    return rows, list(findings.notes)
