"""Calling Triton for one request: batched with its neighbours, bounded, timed out, retried when transient.

At most ``concurrency`` calls are in flight per model; the requests that arrive while they are
on their way go to Triton together as the next [N, 1] call (``mlp.coalesce``): one gRPC round
trip instead of N, and batches as large as the load makes them, without a timer. A batch fails as
a whole, so a batch refused for its input is asked again row by row, and only the invalid request
fails. A model whose registry entry says ``worker_batching=False`` gets one call per request
instead (up to ``concurrency * max_batch`` in flight): Triton's dynamic batcher forms its batches,
and each request's trace keeps Triton's spans of its own.

Transient errors (Triton unavailable, a call past its timeout) are retried with exponential
backoff and full jitter; a permanent one (the model refused the input) fails at once. The
answer is a ``TritonOutcome`` the pure decision code turns into events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from events.model import InferenceRequested
from events.registry import ModelSpec
from ml_service.client import (
    InferenceOutput,
    ModelInputError,
    Row,
    TritonClient,
    TritonError,
    TritonTimeout,
    TritonUnavailable,
)
from ml_worker.decide import Succeeded, TritonFailed, TritonOutcome
from ml_worker.tracing import record_triton_outcome, triton_span
from mlp import metrics, telemetry
from mlp.backoff import Backoff
from mlp.coalesce import Coalescer

log = logging.getLogger(__name__)

# The longest pause between two tries, whatever the retry count.
BACKOFF_CAP_S = 5.0


@dataclass(frozen=True)
class TritonCall:
    row: Row
    request_id: str
    headers: dict[str, str] | None


class TritonCaller:
    def __init__(
        self,
        client: TritonClient,
        *,
        concurrency: int,
        retries: int,
        backoff_s: float,
        max_batch: int = 64,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        models: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        self._client = client
        # aiormq runs every delivery in its own task (up to the prefetch); rather than one gRPC
        # call each, they share ``concurrency`` calls in flight per model.
        self._batches: Coalescer[str, TritonCall, InferenceOutput] = Coalescer(
            self._send, max_batch=max_batch, max_in_flight=concurrency, name="triton-batch"
        )
        # The models Triton batches for the worker (registry: worker_batching=False), each with its bound
        # of calls in flight: as many rows as the coalesced calls would carry.
        self._unbatched = {
            name: asyncio.Semaphore(concurrency * min(max_batch, spec.max_batch_size))
            for name, spec in (models or {}).items()
            if not spec.worker_batching
        }
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self._retries = retries
        # Full jitter: the workers whose calls failed together do not retry together.
        self._backoff = Backoff(base_s=backoff_s, cap_s=BACKOFF_CAP_S, jitter=1.0)
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def infer(self, request: InferenceRequested) -> TritonOutcome:
        with triton_span(request, self._client.url) as span:
            outcome = await self._infer(request)
            record_triton_outcome(span, outcome)
        return outcome

    async def _infer(self, request: InferenceRequested) -> TritonOutcome:
        started = time.perf_counter()
        delays = list(itertools.islice(self._backoff.delays(self._rng), self._retries))
        last: TritonError | None = None
        for attempt in range(len(delays) + 1):
            if attempt:
                await self._sleep(delays[attempt - 1])
            call = TritonCall(Row(request.prompt, request.max_tokens), request.request_id, _trace_headers(request))
            try:
                output = await self._call(request.model, call)
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
            return Succeeded(
                output.text, output.prompt_tokens, output.completion_tokens, latency_ms, embedding=output.embedding
            )
        return _gave_up(last, len(delays) + 1)

    async def _call(self, model: str, call: TritonCall) -> InferenceOutput:
        bound = self._unbatched.get(model)
        if bound is None:
            return await self._batches.call(model, call)
        async with bound:
            return await self._send_one(model, call)

    async def _send(self, model: str, calls: list[TritonCall]) -> list[InferenceOutput | BaseException]:
        """One Triton call for the batch; row by row when the batch was refused for its input."""
        metrics.BATCH_SIZE.labels(model=model).observe(len(calls))
        try:
            # One call carries one trace context: the first request's (Triton's own spans join that trace).
            return list(
                await self._client.infer_batch(
                    model,
                    [call.row for call in calls],
                    headers=calls[0].headers,
                    request_id=calls[0].request_id if len(calls) == 1 else None,
                )
            )
        except ModelInputError:
            if len(calls) == 1:
                raise
        log.info("triton refused a batch of %d for its input; asking row by row", len(calls))
        return list(await asyncio.gather(*(self._send_one(model, call) for call in calls), return_exceptions=True))

    async def _send_one(self, model: str, call: TritonCall) -> InferenceOutput:
        metrics.BATCH_SIZE.labels(model=model).observe(1)
        return await self._client.infer(
            model, call.row.prompt, call.row.max_tokens, headers=call.headers, request_id=call.request_id
        )


def _gave_up(last: TritonError | None, tries: int) -> TritonFailed:
    if isinstance(last, TritonTimeout):
        return TritonFailed("triton_timeout", f"Triton did not answer in time ({tries} tries): {last}")
    if isinstance(last, TritonUnavailable):
        return TritonFailed("triton_unavailable", f"Triton unavailable ({tries} tries): {last}")
    return TritonFailed("model_error", f"Triton kept failing ({tries} tries): {_describe(last)}")


def _describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}"


def _trace_headers(request: InferenceRequested) -> dict[str, str] | None:
    # Tracing on: the gRPC client instrumentation puts its own span's traceparent in the metadata; a second
    # one of ours made Triton start a root trace now and then (two values for one key). Tracing off: the
    # request's, so Triton's own tracing can still join the request's trace.
    if telemetry.current_traceparent() is not None:
        return None
    return {"traceparent": request.traceparent} if request.traceparent else None
