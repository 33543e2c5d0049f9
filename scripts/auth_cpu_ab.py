"""Gateway CPU per submit with auth on (a stored key presented) and off (open mode), same run, A/B/A/B.

Each arm is one `python -m ops.cli gateway` process on its own test namespace (real RabbitMQ, Postgres,
Redis; no worker); CPU is the process's utime+stime from /proc around each round. BASELINE=<checkout>
adds a third arm: that checkout's gateway in open mode. Run from the repository root:

    PYTHONPATH=$PWD/platform:$PWD N=2000 ROUNDS=4 .venv/bin/python scripts/auth_cpu_ab.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import httpx

from events.model import utc_now
from mlp.settings import Settings
from projections.migrate import migrate
from tenancy.key_store import KeyStore
from tenancy.keys import pepper_of
from tests.support.isolation import isolated_namespace
from tests.support.services import free_port

N = int(os.environ.get("N", "1500"))
CONCURRENCY = 16
ROUNDS = int(os.environ.get("ROUNDS", "3"))
USER = "bench-user"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


async def prepare(dsn: str, with_key: bool) -> str | None:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        big = 10**12
        await conn.execute(
            "INSERT INTO quota_plans (name, tokens_per_day, tokens_per_month, requests_per_minute,"
            " max_tokens_per_request) VALUES ('bench', $1, $1, $1, 4096) ON CONFLICT DO NOTHING",
            big,
        )
        await conn.execute("INSERT INTO user_quotas (user_id, plan) VALUES ($1, 'bench')", USER)
    finally:
        await conn.close()
    if not with_key:
        return None
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        created = await KeyStore(pool, pepper_of(Settings(environment="test"))).create(USER, "user", utc_now())
    finally:
        await pool.close()
    return created.plaintext


async def load(url: str, key: str | None, n: int) -> dict[int, int]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": "test prompt", "user_id": USER, "model": "basic-model", "max_tokens": 16}
    codes: dict[int, int] = {}
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:

        async def worker() -> None:
            for _ in todo:
                r = await c.post("/api/v1/inference", json=body, headers=headers)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return codes


def main() -> None:
    arms: dict[str, tuple[str, bool]] = {"off": (os.getcwd(), False), "on": (os.getcwd(), True)}
    if os.environ.get("BASELINE"):
        arms["main"] = (os.environ["BASELINE"], False)
    with ExitStack() as stack:
        procs: dict[str, tuple[subprocess.Popen[bytes], str, str | None]] = {}
        logdir = Path(tempfile.mkdtemp(prefix="authcpu-"))
        for name, (tree, with_key) in arms.items():
            ns = stack.enter_context(isolated_namespace(f"acpu{name}"))
            key = asyncio.run(prepare(ns.postgres_dsn, with_key))
            port = free_port()
            env = {
                **os.environ,
                **ns.env(),
                "PYTHONPATH": f"{tree}/platform:{tree}",
                "MLP_GATEWAY_PORT": str(port),
                "OTEL_SDK_DISABLED": "true",
                "MLP_LOG_LEVEL": "WARNING",
            }
            env.pop("MLP_API_KEYS", None)
            log = (logdir / f"{name}.log").open("ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "gateway"], env=env, stdout=log, stderr=log, cwd=tree
            )
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{name} did not start: {(logdir / f'{name}.log').read_text()[-2000:]}")
                time.sleep(0.3)
            procs[name] = (proc, url, key)
            print(f"{name}: pid {proc.pid} at {url} (tree {tree}, key {'yes' if key else 'no'})", flush=True)

        for name, (_, url, key) in procs.items():  # warm-up: imports, pools, caches
            print(f"warm-up {name}: {asyncio.run(load(url, key, 300))}", flush=True)
        results: dict[str, list[float]] = {name: [] for name in procs}
        for round_ in range(ROUNDS):
            for name, (proc, url, key) in procs.items():
                before, t0 = cpu_s(proc.pid), time.monotonic()
                codes = asyncio.run(load(url, key, N))
                used, wall = cpu_s(proc.pid) - before, time.monotonic() - t0
                per_req_us = used / N * 1e6
                results[name].append(per_req_us)
                print(
                    f"round {round_ + 1} {name:>4}: {per_req_us:7.0f} us CPU/request  ({used:.2f} s CPU, "
                    f"{N / wall:.0f} req/s wall) {codes}",
                    flush=True,
                )
        print()
        for name, values in results.items():
            mean = sum(values) / len(values)
            print(f"{name:>4}: mean {mean:.0f} us CPU/request over {len(values)} rounds: {[round(v) for v in values]}")
        off = sum(results["off"]) / ROUNDS
        on = sum(results["on"]) / ROUNDS
        print(f"on/off = {on / off:.3f}")
        if "main" in results:
            print(f"off/main = {off / (sum(results['main']) / ROUNDS):.3f}")


if __name__ == "__main__":
    main()
