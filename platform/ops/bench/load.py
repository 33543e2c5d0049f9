"""The load generator of ``mlp bench``: HTTP POSTs to the real gateway, open- or closed-loop.

Client: aiohttp with a keep-alive connection pool. On this 2-core machine httpx's AsyncClient
spent about 2.1 ms of CPU per request against a bare uvicorn app (about 450 req/s from one
process), aiohttp about 0.1 ms (about 10,000 req/s): with httpx the benchmark itself would be
the bottleneck and steal the CPU the platform needs.

Open loop sends request i at ``start + i / rate`` whatever the answers do, and measures each
response from its scheduled time, so a slow gateway shows as latency instead of silently
lowering the offered rate (no coordinated omission). Closed loop keeps ``concurrency`` requests
outstanding: it finds the most the gateway accepts.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import msgspec

# Open loop: the most requests in flight before the scheduler waits (memory bound when the
# platform stops answering); hitting it is reported, because the offered rate then drops.
MAX_IN_FLIGHT: Final = 20_000
_HEADERS: Final = {"Content-Type": "application/json"}


class _Accepted(msgspec.Struct):
    request_id: str


_decode_accepted = msgspec.json.Decoder(_Accepted).decode


@dataclass(frozen=True, slots=True)
class LoadPlan:
    url: str  # POST target: <gateway>/api/v1/inference
    body: bytes
    rate: float | None = None  # open loop, requests per second
    concurrency: int | None = None  # closed loop
    duration_s: float | None = None
    requests: int | None = None
    connections: int = 64
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) and concurrency (closed loop)")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of duration_s and requests")


@dataclass(slots=True)
class LoadStats:
    """Running counters (read by the progress line while the load runs) and the samples."""

    sent: int = 0
    answered: int = 0
    accepted: int = 0
    status: Counter[str] = field(default_factory=Counter)
    response_s: list[float] = field(default_factory=list)
    accepted_ids: set[str] = field(default_factory=set)
    started_wall: float = 0.0
    elapsed_s: float = 0.0
    max_lag_s: float = 0.0  # open loop: how far the scheduler fell behind its timetable
    throttled: int = 0  # open loop: sends delayed because MAX_IN_FLIGHT was reached


OnAccepted = Callable[[str, float], None]


def encode_body(prompt: str, user_id: str, model: str, max_tokens: int | None) -> bytes:
    body: dict[str, object] = {"prompt": prompt, "user_id": user_id, "model": model}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return msgspec.json.encode(body)


def new_session(plan: LoadPlan) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=plan.connections, keepalive_timeout=60, ttl_dns_cache=None)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=plan.timeout_s),
        skip_auto_headers=("User-Agent",),
    )


class LoadRunner:
    def __init__(self, session: aiohttp.ClientSession, plan: LoadPlan, on_accepted: OnAccepted) -> None:
        self._session = session
        self._plan = plan
        self._on_accepted = on_accepted
        self.stats = LoadStats()
        self._t0 = 0.0

    async def run(self) -> LoadStats:
        self._t0 = time.perf_counter()
        self.stats.started_wall = time.time()
        if self._plan.rate is not None:
            await self._open_loop(self._plan.rate)
        else:
            assert self._plan.concurrency is not None
            await asyncio.gather(*(self._closed_worker() for _ in range(self._plan.concurrency)))
        self.stats.elapsed_s = time.perf_counter() - self._t0
        return self.stats

    def _more(self, index: int, now: float) -> bool:
        if self._plan.requests is not None:
            return index < self._plan.requests
        assert self._plan.duration_s is not None
        return now - self._t0 < self._plan.duration_s

    async def _open_loop(self, rate: float) -> None:
        interval = 1.0 / rate
        in_flight: set[asyncio.Task[None]] = set()
        index = 0
        while True:
            due = self._t0 + index * interval
            if not self._more(index, due):
                break
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                self.stats.max_lag_s = max(self.stats.max_lag_s, now - due)
            if len(in_flight) >= MAX_IN_FLIGHT:
                self.stats.throttled += 1
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._one(due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            index += 1
        if in_flight:
            await asyncio.wait(in_flight)

    async def _closed_worker(self) -> None:
        while self._more(self.stats.sent, time.perf_counter()):
            await self._one(time.perf_counter())

    async def _one(self, scheduled: float) -> None:
        """One POST; latency runs from its scheduled time (open loop) or its send (closed loop)."""
        stats = self.stats
        stats.sent += 1
        status = "error"
        payload = b""
        try:
            async with self._session.post(self._plan.url, data=self._plan.body, headers=_HEADERS) as response:
                payload = await response.read()
                status = str(response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        stats.response_s.append(time.perf_counter() - scheduled)
        stats.answered += 1
        stats.status[status] += 1
        if status == "202":
            try:
                request_id = _decode_accepted(payload).request_id
            except msgspec.DecodeError:
                stats.status["202-unreadable"] += 1
                return
            stats.accepted += 1
            stats.accepted_ids.add(request_id)
            self._on_accepted(request_id, stats.started_wall + (scheduled - self._t0))
