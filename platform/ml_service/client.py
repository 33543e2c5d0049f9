"""The async gRPC Triton client of the ML worker (``tritonclient.grpc.aio``).

One client (one HTTP/2 channel) per process, created in the worker's lifespan and reused.
Every call carries a client timeout (tritonclient has none by default). gRPC failures are
translated into this context's errors, split into transient (retry may help) and permanent;
retrying is the worker's decision (see ``ml_service.retry``), not the client's.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def build_inputs(prompt: str, max_tokens: int) -> list[InferInput]:
    if not 0 <= max_tokens <= INT32_MAX:
        raise ModelInputError(f"max_tokens must be between 0 and {INT32_MAX}, got {max_tokens}")
    text = InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=np.object_))
    limit = InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [text, limit]


def parse_outputs(text: Any, prompt_tokens: Any, completion_tokens: Any) -> InferenceOutput:
    """The first row of the three output tensors (numpy arrays, or None when missing)."""
    if text is None or prompt_tokens is None or completion_tokens is None:
        raise ModelOutputError(f"the model must return {', '.join(OUTPUTS)}")
    try:
        raw = text.reshape(-1)[0]
        decoded = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        return InferenceOutput(
            text=decoded,
            prompt_tokens=int(prompt_tokens.reshape(-1)[0]),
            completion_tokens=int(completion_tokens.reshape(-1)[0]),
        )
    except (IndexError, UnicodeDecodeError, ValueError) as exc:
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
        inputs = build_inputs(prompt, max_tokens)
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
        return parse_outputs(*(result.as_numpy(name) for name in OUTPUTS))

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
