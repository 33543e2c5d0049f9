"""What a request must satisfy, in one place: the id alphabets, the limits, and the check itself.

Every edge applies these same rules: the gateway (HTTP), the worker (the bus is untrusted input)
and the collector. Schemas take their patterns and bounds from here (msgspec ``Meta``, pydantic
``StringConstraints``, FastAPI ``Path``/``Query``); ``check_request`` answers with a ``Rejection``
that each edge translates (the gateway into its HTTP error, the worker into ``InferenceRejected``).

Pure data and pure functions: no I/O, no framework.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:  # the registry imports the topology, which imports the events, which import these rules
    from events.registry import ModelSpec

# Identifiers (user ids, request ids, event and correlation ids) travel in routing keys and URLs:
# no dots, wildcards or whitespace.
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9_\-:@]{1,128}$"
MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9_\-]{1,64}$"
IDENTIFIER: Final = re.compile(IDENTIFIER_PATTERN)
MODEL_NAME: Final = re.compile(MODEL_NAME_PATTERN)

MIN_PROMPT_CHARS: Final = 1
MIN_MAX_TOKENS: Final = 1

RejectReason = Literal[
    "quota_exceeded",
    "unknown_model",
    "invalid_request",
    "prompt_too_large",
    "max_tokens_too_large",
]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a request is refused: a reason code (events, metrics labels) and a message for people."""

    reason: RejectReason
    message: str


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The configured limits a request is checked against."""

    models: Collection[str]  # the served models
    max_prompt_chars: int
    max_tokens_limit: int  # max_tokens must lie in MIN_MAX_TOKENS..max_tokens_limit
    default_max_tokens: int  # a request that names no max_tokens gets this many
    # A plan's per-request ceiling when the caller knows it (quota.plans.Limits.max_tokens_per_request);
    # None: only max_tokens_limit applies.
    max_tokens_per_request: int | None = None
    # The served models' registry entries (events.registry): their task and own limits. A served model
    # without one is checked by the limits above alone.
    specs: Mapping[str, ModelSpec] = field(default_factory=lambda: MappingProxyType({}))

    def effective_max_tokens(self, max_tokens: int | None, model: str | None = None) -> int:
        """The max_tokens a request carries: its own, else the model's default, else the platform's.

        An embedding generates no tokens: whatever was asked, its requests carry the minimum.
        """
        spec = self.specs.get(model) if model is not None else None
        if spec is not None and spec.task == "embed":
            return MIN_MAX_TOKENS
        if max_tokens is not None:
            return max_tokens
        if spec is not None and spec.default_max_tokens is not None:
            return spec.default_max_tokens
        return self.default_max_tokens

    def max_tokens_limit_of(self, model: str) -> int:
        spec = self.specs.get(model)
        if spec is None or spec.max_tokens_limit is None:
            return self.max_tokens_limit
        return min(spec.max_tokens_limit, self.max_tokens_limit)

    def max_input_tokens_of(self, model: str) -> int | None:
        """The model's input limit in its own tokens; None when it has none (then nobody counts them)."""
        spec = self.specs.get(model)
        return None if spec is None else spec.max_input_tokens


def check_model(model: str, served: Collection[str]) -> Rejection | None:
    if model in served:
        return None
    return Rejection("unknown_model", f"unknown model {model!r}; this platform serves: {', '.join(sorted(served))}")


def check_prompt_text(prompt: str) -> Rejection | None:
    """The prompt's content, whatever the limits: not empty, and storable."""
    if len(prompt) < MIN_PROMPT_CHARS:
        return Rejection("invalid_request", "prompt is empty")
    if "\x00" in prompt:  # Postgres text/jsonb cannot hold U+0000: the event could never be stored
        return Rejection("invalid_request", "prompt must not contain NUL characters (U+0000)")
    return None


def check_request(
    *, model: str, prompt: str, max_tokens: int, limits: RequestLimits, prompt_tokens: int | None = None
) -> Rejection | None:
    """The first rule ``max_tokens`` (already defaulted) and the rest of the request break, or None.

    ``prompt_tokens``: the prompt's length in the model's own tokens, counted by the caller when the
    model has an input limit in tokens (``limits.max_input_tokens_of(model)``); None skips that rule.
    """
    rejection = check_model(model, limits.models) or check_prompt_text(prompt)
    if rejection is not None:
        return rejection
    if len(prompt) > limits.max_prompt_chars:
        return Rejection(
            "prompt_too_large", f"prompt has {len(prompt)} characters; the limit is {limits.max_prompt_chars}"
        )
    token_limit = limits.max_input_tokens_of(model)
    if token_limit is not None and prompt_tokens is not None and prompt_tokens > token_limit:
        return Rejection(
            "prompt_too_large",
            f"prompt has {prompt_tokens} tokens ({model}'s tokenizer); {model} takes at most {token_limit}",
        )
    spec = limits.specs.get(model)
    if spec is not None and spec.task == "embed":
        return None  # an embedding generates nothing: max_tokens does not apply
    if max_tokens < MIN_MAX_TOKENS:
        return Rejection("invalid_request", f"max_tokens is {max_tokens}; it must be at least {MIN_MAX_TOKENS}")
    max_tokens_limit = limits.max_tokens_limit_of(model)
    if max_tokens > max_tokens_limit:
        return Rejection("max_tokens_too_large", f"max_tokens is {max_tokens}; the limit is {max_tokens_limit}")
    if limits.max_tokens_per_request is not None:
        return check_max_tokens_per_request(max_tokens, limits.max_tokens_per_request)
    return None


def check_max_tokens_per_request(max_tokens: int, limit: int, plan: str | None = None) -> Rejection | None:
    """A plan's per-request ceiling (quota.plans.Limits.max_tokens_per_request; the quota admission applies it)."""
    if max_tokens <= limit:
        return None
    whose = f"the {plan} plan's" if plan is not None else "the plan's"
    return Rejection("max_tokens_too_large", f"max_tokens {max_tokens} exceeds {whose} limit of {limit} per request")
