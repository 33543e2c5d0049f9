"""The async gRPC Triton client of the ML worker (``tritonclient.grpc.aio``).

One client (one HTTP/2 channel) per process, created in the worker's lifespan and reused.
Every call carries a client timeout (tritonclient has none by default). gRPC failures are
translated into this context's errors, split into transient (retry may help) and permanent;
retrying is the worker's decision (see ``ml_worker.inference``), not the client's.

What a call sends and how its answer reads come from the model's registry entry
(``events.registry``): Triton's model name and version, and the tensor contract of its task
(``generate``: text in, text and token counts out; ``embed``: text in, an embedding and its
token count out). A name the registry does not hold is called with the generate contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Final

import msgspec
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from events.registry import (
    EMBEDDING_OUTPUT,
    MAX_TOKENS_INPUT,
    PROMPT_TOKENS_OUTPUT,
    REGISTRY,
    TEXT_INPUT,
    ModelSpec,
    TensorContract,
    TokenizerSpec,
    generate_contract,
)

INT32_MAX = 2**31 - 1
GENERATE: Final = generate_contract()
OUTPUTS = GENERATE.output_names
# An embedding's floats go into events and JSON answers: float32 carries about 7 significant digits,
# and 8 decimal places halve the JSON of a 384-float vector (cosine to the exact one: 1 - 1e-12).
EMBEDDING_DECIMALS: Final = 8
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
    embedding: list[float] | None = None  # embed models: the vector (text is "", completion_tokens 0)


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


def build_inputs(rows: Sequence[Row], contract: TensorContract = GENERATE) -> list[InferInput]:
    """The [N, 1] input tensors of N requests (the model's max_batch_size bounds N); ``max_tokens``
    only for a contract that takes it."""
    if not rows:
        raise ValueError("a Triton call needs at least one row")
    shape = [len(rows), 1]
    text = InferInput(TEXT_INPUT, shape, "BYTES")
    text.set_data_from_numpy(np.array([[row.prompt.encode("utf-8")] for row in rows], dtype=np.object_))
    if MAX_TOKENS_INPUT not in contract.input_names:
        return [text]
    for row in rows:
        if not 0 <= row.max_tokens <= INT32_MAX:
            raise ModelInputError(f"max_tokens must be between 0 and {INT32_MAX}, got {row.max_tokens}")
    limit = InferInput(MAX_TOKENS_INPUT, shape, "INT32")
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


def parse_embeddings(
    embedding: Any, prompt_tokens: Any, rows: int = 1, dimension: int | None = None
) -> list[InferenceOutput]:
    """The first ``rows`` rows of an embed model's outputs: [N, D] FP32 and [N, 1] INT32 (None when missing)."""
    if embedding is None or prompt_tokens is None:
        raise ModelOutputError(f"the model must return {EMBEDDING_OUTPUT} and {PROMPT_TOKENS_OUTPUT}")
    vectors = np.asarray(embedding)
    counts = np.asarray(prompt_tokens).reshape(-1)
    if vectors.ndim != 2 or len(vectors) < rows or len(counts) < rows:
        raise ModelOutputError(f"the model answered {vectors.shape} for {rows} rows")
    if dimension is not None and vectors.shape[1] != dimension:
        raise ModelOutputError(f"the model answered {vectors.shape[1]}-dimensional embeddings, not {dimension}")
    if not np.isfinite(vectors[:rows]).all():
        raise ModelOutputError("the model answered an embedding that is not finite")
    rounded = np.round(vectors[:rows].astype(np.float64), EMBEDDING_DECIMALS).tolist()
    return [
        InferenceOutput(text="", prompt_tokens=int(counts[i]), completion_tokens=0, embedding=rounded[i])
        for i in range(rows)
    ]


def unregistered(model: str) -> ModelSpec:
    """How a name the registry does not hold is called: Triton's model of that name, generate contract."""
    return ModelSpec(
        name=model,
        task="generate",
        summary="",
        contract=GENERATE,
        tokenizer=TokenizerSpec(""),
        max_batch_size=1,
    )


class TritonClient:
    def __init__(self, url: str, timeout_s: float, models: Mapping[str, ModelSpec] = REGISTRY) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0: a Triton call without a deadline can hang forever")
        self.url = url
        self.timeout_s = timeout_s
        self._models = models
        self._client: grpcclient.InferenceServerClient | None = None

    def spec(self, model: str) -> ModelSpec:
        return self._models.get(model) or unregistered(model)

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
        spec = self.spec(model)
        inputs = build_inputs(rows, spec.contract)
        outputs = [InferRequestedOutput(name) for name in spec.contract.output_names]
        try:
            result = await self._grpc().infer(
                model_name=spec.triton_name,
                inputs=inputs,
                model_version=spec.triton_version_label,
                outputs=outputs,
                request_id=request_id or "",
                # gRPC metadata keys are lower-case (W3C traceparent/tracestate already are).
                headers={k.lower(): v for k, v in headers.items()} if headers else None,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise classify(exc.status(), exc.message() or str(exc)) from exc
        if spec.task == "embed":
            return parse_embeddings(
                result.as_numpy(EMBEDDING_OUTPUT),
                result.as_numpy(PROMPT_TOKENS_OUTPUT),
                rows=len(rows),
                dimension=spec.embedding_dimension,
            )
        text, prompt_tokens, completion_tokens = (result.as_numpy(name) for name in OUTPUTS)
        return parse_outputs(text, prompt_tokens, completion_tokens, rows=len(rows))

    async def execution_counts(self, model: str) -> tuple[int, int] | None:
        """(requests, executions) Triton has counted for the model since it loaded it: their ratio is the
        size of the batches Triton's dynamic batcher formed. None when Triton cannot tell."""
        spec = self.spec(model)
        try:
            stats = await self._grpc().get_inference_statistics(
                spec.triton_name, spec.triton_version_label, as_json=True, client_timeout=self.timeout_s
            )
        except InferenceServerException:
            return None
        found = stats.get("model_stats", [])
        if not found:
            return None
        return int(found[0].get("inference_count", 0)), int(found[0].get("execution_count", 0))

    async def is_ready(self, model: str | None = None) -> bool:
        """Server readiness, or one model's; never raises (readiness probes call it)."""
        client = self._grpc()
        try:
            if model is None:
                return bool(await client.is_server_ready(client_timeout=self.timeout_s))
            spec = self.spec(model)
            return bool(
                await client.is_model_ready(
                    spec.triton_name, model_version=spec.triton_version_label, client_timeout=self.timeout_s
                )
            )
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
