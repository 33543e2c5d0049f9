"""The async gRPC Triton client of the ML worker (``tritonclient.grpc.aio``).

One client (one HTTP/2 channel) per process, created in the worker's lifespan and reused.
Every call carries a client timeout (tritonclient has none by default). gRPC failures are
translated into this context's errors, split into transient (retry may help) and permanent;
retrying is the worker's decision (see ``ml_worker.inference``), not the client's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

INT32_MAX = 2**31 - 1
OUTPUTS = ("text_output", "prompt_tokens", "completion_tokens")
# Bounded messages, and a short reconnect backoff: gRPC's default backoff grows to 120 s, which
# would keep failing calls long after a restarted Triton is back.
CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class InferenceOutput(msgspec.Struct, frozen=True):
    text: str
    prompt_tokens: int
    completion_tokens: int


class TritonError(Exception):
    """Base of the Triton client's errors; ``code`` is the gRPC status name when there is one."""

    transient: ClassVar[bool] = False

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TritonUnavailable(TritonError):
    """Triton cannot be reached, is shutting down, or the model is not ready (transient)."""

    transient = True


class TritonTimeout(TritonError):
    """No answer within the client timeout (transient)."""

    transient = True


class TritonServerError(TritonError):
    """Triton or the model failed internally (transient: a crashed Python stub is restarted)."""

    transient = True


class ModelInputError(TritonError):
    """The request is invalid for the model, or the model is unknown (permanent)."""


class ModelOutputError(TritonError):
    """The model answered outside the tensor contract (permanent: a deployment error)."""


_BY_STATUS: dict[str, type[TritonError]] = {
    "UNAVAILABLE": TritonUnavailable,
    "CANCELLED": TritonUnavailable,  # the server cancelled it while shutting down
    "RESOURCE_EXHAUSTED": TritonUnavailable,  # queue full
    "ABORTED": TritonUnavailable,
    "DEADLINE_EXCEEDED": TritonTimeout,
    "INVALID_ARGUMENT": ModelInputError,
    "NOT_FOUND": ModelInputError,  # unknown model
    "OUT_OF_RANGE": ModelInputError,
    "UNIMPLEMENTED": ModelInputError,
}


def classify(status: str | None, message: str) -> TritonError:
    """The error for a gRPC status as tritonclient reports it (``"StatusCode.UNAVAILABLE"``)."""
    code = (status or "").removeprefix("StatusCode.") or None
    kind = _BY_STATUS.get(code or "", TritonServerError)
    return kind(f"Triton {code or 'error'}: {message}", code=code)


class Row(msgspec.Struct, frozen=True):
    """One request of a batched call: its prompt and its max_tokens."""

    prompt: str
    max_tokens: int


def build_inputs(rows: Sequence[Row]) -> list[InferInput]:
    """The [N, 1] input tensors of N requests (the model's max_batch_size bounds N)."""
    if not rows:
        raise ValueError("a Triton call needs at least one row")
    for row in rows:
        if not 0 <= row.max_tokens <= INT32_MAX:
            raise ModelInputError(f"max_tokens must be between 0 and {INT32_MAX}, got {row.max_tokens}")
    shape = [len(rows), 1]
    text = InferInput("text_input", shape, "BYTES")
    text.set_data_from_numpy(np.array([[row.prompt.encode("utf-8")] for row in rows], dtype=np.object_))
    limit = InferInput("max_tokens", shape, "INT32")
    limit.set_data_from_numpy(np.array([[row.max_tokens] for row in rows], dtype=np.int32))
    return [text, limit]


def parse_outputs(text: Any, prompt_tokens: Any, completion_tokens: Any, rows: int = 1) -> list[InferenceOutput]:
    """The first ``rows`` rows of the three output tensors (numpy arrays, or None when missing)."""
    if text is None or prompt_tokens is None or completion_tokens is None:
        raise ModelOutputError(f"the model must return {', '.join(OUTPUTS)}")
    texts, prompts, completions = text.reshape(-1), prompt_tokens.reshape(-1), completion_tokens.reshape(-1)
    if min(len(texts), len(prompts), len(completions)) < rows:
        raise ModelOutputError(f"the model answered fewer than the {rows} rows it was sent")
    try:
        return [
            InferenceOutput(
                text=texts[i].decode("utf-8") if isinstance(texts[i], bytes) else str(texts[i]),
                prompt_tokens=int(prompts[i]),
                completion_tokens=int(completions[i]),
            )
            for i in range(rows)
        ]
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelOutputError(f"unreadable model output: {exc}") from exc


class TritonClient:
    def __init__(self, url: str, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0: a Triton call without a deadline can hang forever")
        self.url = url
        self.timeout_s = timeout_s
        self._client: grpcclient.InferenceServerClient | None = None

    def _grpc(self) -> grpcclient.InferenceServerClient:
        # Created on first use, inside the running event loop the channel belongs to.
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def infer(
        self,
        model: str,
        prompt: str,
        max_tokens: int,
        *,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> InferenceOutput:
        """One request."""
        outputs = await self.infer_batch(model, [Row(prompt, max_tokens)], headers=headers, request_id=request_id)
        return outputs[0]

    async def infer_batch(
        self,
        model: str,
        rows: Sequence[Row],
        *,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> list[InferenceOutput]:
        """Several requests in one call (one [N, 1] tensor each way): one answer per row, in order.

        The call succeeds or fails as a whole: one invalid row fails the batch with ``ModelInputError``.
        """
        inputs = build_inputs(rows)
        outputs = [InferRequestedOutput(name) for name in OUTPUTS]
        try:
            result = await self._grpc().infer(
                model_name=model,
                inputs=inputs,
                outputs=outputs,
                request_id=request_id or "",
                # gRPC metadata keys are lower-case (W3C traceparent/tracestate already are).
                headers={k.lower(): v for k, v in headers.items()} if headers else None,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise classify(exc.status(), exc.message() or str(exc)) from exc
        text, prompt_tokens, completion_tokens = (result.as_numpy(name) for name in OUTPUTS)
        return parse_outputs(text, prompt_tokens, completion_tokens, rows=len(rows))

    async def is_ready(self, model: str | None = None) -> bool:
        """Server readiness, or one model's; never raises (readiness probes call it)."""
        client = self._grpc()
        try:
            if model is None:
                return bool(await client.is_server_ready(client_timeout=self.timeout_s))
            return bool(await client.is_model_ready(model, client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
