"""Calling Triton for one request: bounded concurrency, a timeout per call, retries for transient errors.

Transient errors (Triton unavailable, a call past its timeout) are retried with exponential
backoff and full jitter; a permanent one (the model refused the input) fails at once. The
answer is a ``TritonOutcome`` the pure decision code turns into events.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from events.model import InferenceRequested
from ml_service.client import ModelInputError, TritonClient, TritonError, TritonTimeout, TritonUnavailable
from ml_service.retry import backoff_delays
from ml_worker.decide import Succeeded, TritonFailed, TritonOutcome
from ml_worker.tracing import record_triton_outcome, triton_span
from mlp import metrics, telemetry

log = logging.getLogger(__name__)

# The longest pause between two tries, whatever the retry count.
BACKOFF_CAP_S = 5.0


class TritonCaller:
    def __init__(
        self,
        client: TritonClient,
        *,
        concurrency: int,
        retries: int,
        backoff_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        # aiormq runs every delivery in its own task (up to the prefetch); this bounds how
        # many of them talk to Triton at once, so its dynamic batcher sees full batches
        # without the worker opening hundreds of concurrent gRPC calls.
        self._slots = asyncio.Semaphore(concurrency)
        self._retries = retries
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def infer(self, request: InferenceRequested) -> TritonOutcome:
        with triton_span(request, self._client.url) as span:
            outcome = await self._infer(request)
            record_triton_outcome(span, outcome)
        return outcome

    async def _infer(self, request: InferenceRequested) -> TritonOutcome:
        started = time.perf_counter()
        delays = list(backoff_delays(self._retries, self._backoff_s, BACKOFF_CAP_S, self._rng))
        last: TritonError | None = None
        for attempt in range(len(delays) + 1):
            if attempt:
                await self._sleep(delays[attempt - 1])
            try:
                async with self._slots:
                    metrics.BATCH_SIZE.labels(model=request.model).observe(1)  # one request per call
                    output = await self._client.infer(
                        request.model,
                        request.prompt,
                        request.max_tokens,
                        request_id=request.request_id,
                        headers=_trace_headers(request),
                    )
            except ModelInputError as exc:
                return TritonFailed("invalid_input", f"the model refused the input: {exc}")
            except TritonError as exc:
                if not exc.transient:  # e.g. the model answered outside the tensor contract
                    return TritonFailed("model_error", _describe(exc))
                last = exc
                log.warning(
                    "triton %s for %s (try %d of %d)", _describe(exc), request.request_id, attempt + 1, len(delays) + 1
                )
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            return Succeeded(output.text, output.prompt_tokens, output.completion_tokens, latency_ms)
        return _gave_up(last, len(delays) + 1)


def _gave_up(last: TritonError | None, tries: int) -> TritonFailed:
    if isinstance(last, TritonTimeout):
        return TritonFailed("triton_timeout", f"Triton did not answer in time ({tries} tries): {last}")
    if isinstance(last, TritonUnavailable):
        return TritonFailed("triton_unavailable", f"Triton unavailable ({tries} tries): {last}")
    return TritonFailed("model_error", f"Triton kept failing ({tries} tries): {_describe(last)}")


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}"


def _trace_headers(request: InferenceRequested) -> dict[str, str] | None:
    # The Triton span's context when tracing is on (Triton's own tracing joins below it), else the request's.
    traceparent = telemetry.current_traceparent() or request.traceparent
    return {"traceparent": traceparent} if traceparent else None
