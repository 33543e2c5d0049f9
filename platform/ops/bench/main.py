"""``mlp bench``: the platform measured the way its users judge it, against same-run baselines.

  mlp bench --rate 100 --duration 30            open loop: 100 requests/s for 30 s
  mlp bench --concurrency 64 --requests 20000   closed loop: 64 outstanding requests
  mlp bench --spawn --rate 500 --duration 60 --json bench.json
  mlp bench --soak 10m                          faults under a steady load (ops/bench/soak.py)

Drives load through the real gateway over HTTP, then reads each accepted request's terminal event
from Postgres ``event_store`` (submit -> terminal latency on one machine clock). Before the load it
measures the baselines (broker round trip, direct Triton) and it prints the platform's figures as
ratios of them. Every accepted request must reach a terminal state within ``--grace`` seconds:
a run that loses one exits 1 and names it. Then `mlp reconcile` checks the run's window (the event
store against the read models, the ledger and the Redis counters; ``--no-reconcile`` skips it).
Exit codes: 0 done, 1 lost requests, nothing accepted or drift, 2 bad arguments or the platform is
not reachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, TextIO

import aiohttp
import asyncpg
import msgspec

from ml_service.client import TritonClient
from mlp.cache import create_redis
from mlp.settings import Settings
from ops import reconcile
from ops.bench.baselines import broker_round_trip, sample_event_body, triton_direct
from ops.bench.load import LoadPlan, LoadRunner, LoadStats, encode_body, new_session
from ops.bench.soak_plan import parse_duration
from ops.bench.spawn import SpawnError, spawned_platform
from ops.bench.stats import (
    Baseline,
    Counts,
    Report,
    compute_ratios,
    cpu_ms_per_request,
    per_second,
    render_table,
    summarize,
)
from ops.bench.terminal import TerminalTracker
from ops.drift import render_table as render_drift
from quota import store
from quota.plans import Overrides

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# A limit no benchmark reaches (the quota scripts count in doubles: below 2**53).
UNLIMITED: Final = 10**15
# Ids looked up per progress tick while the load runs (the oldest pending first); the final
# verification looks up all of them.
PROGRESS_POLL_LIMIT: Final = 10_000


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlp bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=_positive_float, help="open loop: requests per second (default 100)")
    load.add_argument("--concurrency", type=_positive_int, help="closed loop: requests outstanding at once")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--duration", type=_positive_float, help="seconds of load (default 30)")
    size.add_argument("--requests", type=_positive_int, help="number of requests")
    parser.add_argument("--user", default="bench-user", help="user id of the requests (default bench-user)")
    parser.add_argument("--model", default="basic-model")
    parser.add_argument("--prompt", default="test prompt")
    parser.add_argument("--max-tokens", type=_positive_int, default=None, help="default: the platform's")
    parser.add_argument("--gateway", help="gateway base URL (default: from MLP_GATEWAY_HOST/PORT)")
    parser.add_argument("--connections", type=_positive_int, default=64, help="HTTP keep-alive pool size")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured requests first (default 50)")
    parser.add_argument("--grace", type=_positive_float, default=60.0, help="seconds for stragglers to finish")
    parser.add_argument("--baseline-requests", type=_positive_int, default=2000)
    parser.add_argument(
        "--baseline-concurrency", type=_positive_int, help="loaded baselines' concurrency (default --concurrency or 32)"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the broker and Triton baselines")
    parser.add_argument("--no-raise-quota", action="store_true", help="leave the user's quota as it is")
    parser.add_argument("--spawn", action="store_true", help="start the platform (mlp up on free ports) for the run")
    parser.add_argument("--json", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.add_argument("--no-reconcile", action="store_true", help="skip `mlp reconcile` of the run's window")
    parser.add_argument(
        "--soak",
        type=_duration,
        metavar="DURATION",
        help="a soak (10m, 60s): open loop at --rate or 50%% of measured capacity while workers are killed, "
        "a private Redis restarted and the collector paused; implies --spawn",
    )
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


class Progress:
    """One status line on stderr while the load runs (rewritten in place on a terminal)."""

    def __init__(self, stats: Callable[[], LoadStats], terminal: Callable[[], int], out: TextIO) -> None:
        self._stats = stats
        self._terminal = terminal
        self._out = out
        self._tty = out.isatty()
        self._last_sent = 0
        self._last_t = time.perf_counter()
        self._t0 = self._last_t

    def line(self) -> str:
        stats = self._stats()
        now = time.perf_counter()
        rate = (stats.sent - self._last_sent) / max(now - self._last_t, 1e-9)
        self._last_sent, self._last_t = stats.sent, now
        terminal = self._terminal()
        return (
            f"[{now - self._t0:6.1f}s] sent {stats.sent}  accepted {stats.accepted}  terminal {terminal}"
            f"  in flight {stats.sent - stats.answered}  {rate:7.1f} req/s"
        )

    def show(self, text: str) -> None:
        if self._tty:
            self._out.write("\r\033[K" + text)
        else:
            self._out.write(text + "\n")
        self._out.flush()

    def end(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()


async def raise_quota(settings: Settings, user_id: str) -> None:
    """Give the benchmark user limits no run reaches (the gateway sees them within its cache time)."""

    overrides = Overrides(
        tokens_per_day=UNLIMITED,
        tokens_per_month=UNLIMITED,
        requests_per_minute=UNLIMITED,
        max_tokens_per_request=settings.max_tokens_limit,
    )
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    try:
        await store.set_user_quota(
            conn, user_id, plan=None, overrides=overrides, clear_overrides=False, default_plan=settings.default_plan
        )
    finally:
        await conn.close()


async def warm_up(session: aiohttp.ClientSession, plan: LoadPlan, tracker: TerminalTracker, timeout_s: float) -> str:
    """Unmeasured requests until ``plan.requests`` were accepted (the gateway's limits cache may lag a
    quota change for a few seconds); returns '' or why it gave up."""
    deadline = time.monotonic() + timeout_s
    assert plan.requests is not None
    accepted = 0
    while accepted < plan.requests:
        runner = LoadRunner(session, plan, tracker.add)
        stats = await runner.run()
        accepted += stats.accepted
        if accepted >= plan.requests:
            break
        if time.monotonic() > deadline:
            return f"warm-up: only {accepted} of {plan.requests} accepted; answers {dict(stats.status)}"
        await asyncio.sleep(1.0)
    return ""


async def triton_counts(triton_url: str, model: str) -> tuple[int, int] | None:
    client = TritonClient(triton_url, 10.0)
    try:
        return await client.execution_counts(model)
    finally:
        await client.close()


def batching_note(model: str, before: tuple[int, int] | None, after: tuple[int, int] | None) -> str:
    """What Triton's statistics say of the batches it formed during the load ('' when they say nothing)."""
    if before is None or after is None or after[1] <= before[1]:
        return ""
    requests, executions = after[0] - before[0], after[1] - before[1]
    return (
        f"Triton ran {requests} requests of {model} in {executions} executions during the load: "
        f"{requests / executions:.1f} per execution (Triton's batches; the worker's are on its /metrics)"
    )


async def _tick(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await action()


def machine_info() -> dict[str, object]:
    uname = os.uname()
    load1, load5, _ = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "host": f"{uname.sysname} {uname.release} {uname.machine}",
        "loadavg_at_start": [round(load1, 2), round(load5, 2)],
        "python": sys.version.split()[0],
    }


CpuProbe = Callable[[], dict[str, float]]
RssProbe = Callable[[], dict[str, int]]


async def run_bench(
    args: argparse.Namespace,
    settings: Settings,
    gateway_url: str,
    err: TextIO,
    cpu_probe: CpuProbe | None = None,
    rss_probe: RssProbe | None = None,
) -> Report:
    rate = args.rate if args.rate is not None or args.concurrency is not None else 100.0
    duration = args.duration if args.duration is not None or args.requests is not None else 30.0
    max_tokens = args.max_tokens
    body = encode_body(args.prompt, args.user, args.model, max_tokens)
    url = gateway_url.rstrip("/") + "/api/v1/inference"
    machine = machine_info()
    notes: list[str] = []

    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2, timeout=10)
    assert pool is not None
    try:
        if not args.no_raise_quota:
            await raise_quota(settings, args.user)
        tracker = TerminalTracker(pool)

        baselines: list[Baseline] = []
        if not args.no_baselines:
            loaded = args.baseline_concurrency or args.concurrency or 32
            levels = (1, loaded) if loaded > 1 else (1,)
            tokens = max_tokens or settings.default_max_tokens
            err.write(f"baselines: broker round trip and direct Triton at concurrency {levels} ...\n")
            event_body = sample_event_body(args.prompt, args.user, args.model, tokens)
            baselines += await broker_round_trip(settings.rabbitmq_url, event_body, levels, args.baseline_requests)
            baselines += await triton_direct(
                settings.triton_url, args.model, args.prompt, tokens, levels, args.baseline_requests
            )

        plan = LoadPlan(
            url=url,
            body=body,
            rate=None if args.concurrency else rate,
            concurrency=args.concurrency,
            duration_s=None if args.requests else duration,
            requests=args.requests,
            connections=max(args.connections, args.concurrency or 0),
        )
        async with new_session(plan) as session:
            if args.warmup > 0:
                err.write(f"warm-up: {args.warmup} requests ...\n")
                warm = LoadPlan(url=url, body=body, concurrency=min(4, args.warmup), requests=args.warmup)
                problem = await warm_up(session, warm, tracker, timeout_s=30.0)
                if problem:
                    notes.append(problem)
                # The load starts on a drained platform; stragglers stay tracked (and verified).
                await tracker.wait_all(10.0)
            warmed = len(tracker.done)
            batches_before = await triton_counts(settings.triton_url, args.model)
            runner = LoadRunner(session, plan, tracker.add)
            cpu_before = cpu_probe() if cpu_probe is not None else {}
            rss_start = rss_probe() if rss_probe is not None else {}
            progress = Progress(lambda: runner.stats, lambda: len(tracker.done) - warmed, err)

            async def report_progress() -> None:
                await tracker.poll(PROGRESS_POLL_LIMIT)
                if not args.quiet:
                    progress.show(progress.line())

            ticker = asyncio.create_task(_tick(1.0, report_progress))
            try:
                stats = await runner.run()
                rss_end = rss_probe() if rss_probe is not None else {}
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                if not args.quiet:
                    progress.end()

        err.write(f"load done; waiting up to {args.grace:.0f}s for {len(tracker.pending)} outcomes ...\n")
        lost = await tracker.wait_all(args.grace)
        batches_after = await triton_counts(settings.triton_url, args.model)
        note = batching_note(args.model, batches_before, batches_after)
        if note:
            notes.append(note)
        # Load and drain: the work the measured requests caused (pollers and timers included).
        cpu_after = cpu_probe() if cpu_probe is not None else {}
    finally:
        await pool.close()

    measured = stats.accepted_ids
    last = tracker.last_terminal_at(measured)
    completed = tracker.count("InferenceCompleted", measured)
    span = (last - stats.started_wall) if last is not None else 0.0
    if stats.max_lag_s > 0.05 and plan.rate is not None:
        notes.append(f"the load generator fell up to {stats.max_lag_s * 1000:.0f} ms behind its timetable")
    if stats.throttled:
        notes.append(f"{stats.throttled} sends waited for the in-flight cap; the offered rate was lower")
    gateway = summarize(stats.response_s)
    end_to_end = summarize(tracker.latencies(measured))
    accepted_per_s = per_second(stats.accepted, stats.elapsed_s)
    completed_per_s = per_second(completed, span)
    http_errors = sum(v for k, v in stats.status.items() if k not in ("202", "429"))
    counts = Counts(
        sent=stats.sent,
        accepted=stats.accepted,
        rejected_http=stats.status.get("429", 0),
        http_errors=http_errors,
        completed=completed,
        failed=tracker.count("InferenceFailed", measured),
        rejected_events=tracker.count("InferenceRejected", measured),
        lost=len(lost),
        http_status=dict(stats.status),
    )
    cpu = cpu_ms_per_request(cpu_before, cpu_after, stats.accepted)
    return Report(
        mode="open-loop" if plan.rate is not None else "closed-loop",
        target=f"at {plan.rate:g} req/s" if plan.rate is not None else f"at concurrency {plan.concurrency}",
        duration_s=stats.elapsed_s,
        user_id=args.user,
        model=args.model,
        machine=machine,
        counts=counts,
        accepted_per_s=accepted_per_s,
        completed_per_s=completed_per_s,
        gateway=gateway,
        end_to_end=end_to_end,
        baselines=baselines,
        ratios=compute_ratios(gateway, end_to_end, accepted_per_s, completed_per_s, baselines, cpu),
        lost_request_ids=sorted(lost),
        notes=notes,
        service_cpu_ms_per_request=cpu,
        service_rss_kib_start=rss_start,
        service_rss_kib_end=rss_end,
    )


async def _reachable(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url.rstrip("/") + "/readyz") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def reconcile_run(settings: Settings, started: datetime, grace_s: float, out: TextIO) -> bool:
    """``mlp reconcile`` of the run's window (confirmed by a second look); True when the books balance."""
    window = reconcile.Window(started, datetime.now(UTC) + timedelta(seconds=1))
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    client = create_redis(settings, max_connections=4)
    try:
        findings = await reconcile.check_settled(conn, client, settings, window, 1.0, grace_s=grace_s)
    finally:
        await client.aclose()
        await conn.close()
    out.write(f"reconcile of the run ({findings.requests} requests, {findings.events} events):\n")
    out.write(render_drift(findings.drift) + "\n")
    return not findings.drift


async def _main(args: argparse.Namespace, settings: Settings, out: TextIO, err: TextIO) -> int:
    started = datetime.now(UTC)
    if args.soak is not None:
        from ops.bench.soak import soak  # it builds on this module's pieces

        return await soak(args, settings, out, err)
    if args.spawn:
        err.write("spawning the platform (mlp up on free ports) ...\n")
        try:
            async with spawned_platform(settings, os.environ) as spawned:
                settings = spawned.settings
                report = await run_bench(
                    args, spawned.settings, spawned.gateway_url, err, spawned.cpu_seconds, spawned.rss_kib
                )
        except SpawnError as exc:
            err.write(f"mlp bench: the spawned platform did not start: {exc}\n")
            return EXIT_USAGE
    else:
        gateway_url = args.gateway or f"http://{settings.gateway_host}:{settings.gateway_port}"
        if not await _reachable(gateway_url):
            err.write(
                f"mlp bench: no ready gateway at {gateway_url} (start the platform with `mlp up`, "
                "or run `mlp bench --spawn`)\n"
            )
            return EXIT_USAGE
        report = await run_bench(args, settings, gateway_url, err)
    out.write(render_table(report) + "\n")
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report.as_dict()), indent=2) + b"\n")
        err.write(f"report written to {args.json}\n")
    if report.counts.lost:
        err.write(f"mlp bench: FAILED: {report.counts.lost} accepted requests were lost\n")
        return EXIT_FAILED
    if report.counts.accepted == 0:
        err.write("mlp bench: FAILED: the gateway accepted no request\n")
        return EXIT_FAILED
    if not args.no_reconcile and not await reconcile_run(settings, started, args.grace, out):
        err.write("mlp bench: FAILED: the books do not balance (see the drift above; mlp reconcile --repair)\n")
        return EXIT_FAILED
    return EXIT_OK


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.soak is not None and (args.concurrency or args.duration or args.requests or args.gateway):
        parser.error(
            "--soak takes --rate (or measures capacity) and runs its own platform: "
            "not --concurrency, --duration, --requests or --gateway"
        )
    settings = Settings()
    with _runner() as runner:
        return runner.run(_main(args, settings, out or sys.stdout, err or sys.stderr))
