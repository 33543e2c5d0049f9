"""One delivery attempt over HTTP: the SSRF guard again (DNS may have changed since registration), the
Standard Webhooks headers, a bounded wait and a bounded read of the answer. No redirects are followed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from webhooks import signing
from webhooks.ssrf import TargetGuard, UnsafeTarget
from webhooks.store import DueDelivery

USER_AGENT = "mlp-webhooks/1"
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status_code: int | None  # None: no HTTP answer (refused target, connection error, timeout)
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def http_client(timeout_s: float) -> httpx.AsyncClient:
    """The dispatcher's client: one timeout for every phase, no redirects, no proxies from the environment."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
    )


class Sender:
    def __init__(
        self, client: httpx.AsyncClient, guard: TargetGuard, *, timeout_s: float, max_response_bytes: int
    ) -> None:
        self._client = client
        self._guard = guard
        self._timeout_s = timeout_s
        self._max_response_bytes = max_response_bytes

    async def attempt(self, due: DueDelivery) -> AttemptResult:
        if due.secret is None:
            return AttemptResult(None, "no signing secret for this delivery")
        try:
            await self._guard.check(due.url)
        except UnsafeTarget as exc:
            return AttemptResult(None, f"refused target: {exc}"[:_MAX_ERROR_CHARS])
        headers = signing.headers(due.secret, due.event_id, int(time.time()), due.body)
        try:
            async with self._client.stream("POST", due.url, content=due.body, headers=headers) as response:
                await self._read_bounded(response)
                return AttemptResult(
                    response.status_code, None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
                )
        except httpx.TimeoutException:
            return AttemptResult(None, f"timed out after {self._timeout_s:g} s")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return AttemptResult(None, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])

    async def _read_bounded(self, response: httpx.Response) -> None:
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= self._max_response_bytes:
                break  # the answer's body is not used; a receiver cannot make us read without end
