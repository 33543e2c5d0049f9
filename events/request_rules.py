"""What a request must satisfy, in one place: the id alphabets, the limits, and the check itself.

Every edge applies these same rules: the gateway (HTTP), the worker (the bus is untrusted input)
and the collector. Schemas take their patterns and bounds from here (msgspec ``Meta``, pydantic
``StringConstraints``, FastAPI ``Path``/``Query``); ``check_request`` answers with a ``Rejection``
that each edge translates (the gateway into its HTTP error, the worker into ``InferenceRejected``).

Pure data and pure functions: no I/O, no framework.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:  # the registry imports the topology, which imports the events, which import these rules
    from events.registry import ModelSpec

import msgspec

# Identifiers (user ids, event and correlation ids) travel in routing keys and URLs:
# no dots, wildcards or whitespace.
IDENTIFIER_PATTERN: Final = r"^[A-Za-z0-9_\-:@]{1,128}$"
MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9_\-]{1,64}$"
IDENTIFIER: Final = re.compile(IDENTIFIER_PATTERN)
MODEL_NAME: Final = re.compile(MODEL_NAME_PATTERN)
# Request ids never travel in routing keys, and may hold a '.': a namespaced id ``<user_id>.<suffix>``
# names its owner unambiguously (user ids contain no '.'). See ``check_request_id_for``.
REQUEST_ID_PATTERN: Final = r"^[A-Za-z0-9_\-:@.]{1,200}$"
REQUEST_ID: Final = re.compile(REQUEST_ID_PATTERN)
# The canonical form of a platform id (``events.model.new_event_id``; the gateway's request ids): an
# RFC 9562 UUID, lower-case and hyphenated. Random, so no tenant can guess (and pre-claim) another's.
PLATFORM_UUID_PATTERN: Final = r"^[0-9a-f]{8}-[0-9a-f]{4}-[1-8][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
PLATFORM_UUID: Final = re.compile(PLATFORM_UUID_PATTERN)
NAMESPACE_SEPARATOR: Final = "."

MIN_PROMPT_CHARS: Final = 1
MIN_MAX_TOKENS: Final = 1
# JSON escapes can take 6 bytes per character; plus room for the envelope.
BODY_OVERHEAD_BYTES: Final = 16_384


def max_body_bytes(max_prompt_chars: int) -> int:
    """The largest body a valid request can have; anything bigger is refused before decoding."""
    return max_prompt_chars * 6 + BODY_OVERHEAD_BYTES


RejectReason = Literal[
    "quota_exceeded",
    "unknown_model",
    "invalid_request",
    "prompt_too_large",
    "max_tokens_too_large",
    # The request_id already names another request (another owner, event or content): refused to the
    # publisher only, never on the claimed request's stream (see ``publisher_request_id``).
    "duplicate_request_id",
    # The model's request queue was at its bound (MLP_MAX_QUEUED_PER_MODEL): the broker refused the request,
    # which the gateway answered 503 queue_full; the projections still received it, and this ends it there.
    "queue_full",
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
    return check_model(model, limits.models) or check_bounds(
        model=model, prompt=prompt, max_tokens=max_tokens, limits=limits, prompt_tokens=prompt_tokens
    )


def check_bounds(
    *, model: str, prompt: str, max_tokens: int, limits: RequestLimits, prompt_tokens: int | None = None
) -> Rejection | None:
    """``check_request`` without the served-model rule: the prompt's text, then the sizes."""
    return check_prompt_text(prompt) or check_size(
        model=model, prompt=prompt, max_tokens=max_tokens, limits=limits, prompt_tokens=prompt_tokens
    )


def check_size(
    *, model: str, prompt: str, max_tokens: int, limits: RequestLimits, prompt_tokens: int | None = None
) -> Rejection | None:
    """The platform's size limits alone: the prompt's length and max_tokens (what an event may carry)."""
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


# --- request identity -------------------------------------------------------------------------------
#
# A message on user U's routing key speaks for U only (the routing key is what RabbitMQ's topic
# permissions vouch for). It may name a request ``U.<suffix>`` (U's namespace: nobody else can) or a
# platform UUID (unguessable; whoever claims it first owns it, see quota.scripts' claim). The claim
# records the request's content digest, so a second message with the same id and other content is a
# conflict, never a second inference.


def namespace_owner(request_id: str) -> str | None:
    """The user a namespaced request id ``<user_id>.<suffix>`` belongs to, or None when it has no namespace."""
    owner, dot, suffix = request_id.partition(NAMESPACE_SEPARATOR)
    if not dot or not suffix or IDENTIFIER.fullmatch(owner) is None:
        return None
    return owner


def is_platform_uuid(value: str) -> bool:
    return PLATFORM_UUID.fullmatch(value) is not None


def may_name(user_id: str, request_id: str) -> bool:
    """True when a message for ``user_id`` may name ``request_id``: in the user's namespace, or a platform UUID."""
    if REQUEST_ID.fullmatch(request_id) is None:
        return False
    return is_platform_uuid(request_id) or namespace_owner(request_id) == user_id


def check_request_id_for(user_id: str, request_id: str) -> Rejection | None:
    """Rule 1 of docs/bus.md ("Request identity"): the ids a publisher for ``user_id`` may use."""
    if may_name(user_id, request_id):
        return None
    shown = request_id if len(request_id) <= 64 else request_id[:61] + "..."
    return Rejection(
        "invalid_request",
        f"request_id {shown!r} is not one user {user_id!r} may name: use {user_id}.<your id> "
        f"(your namespace) or a UUID in canonical lower-case form",
    )


def publisher_request_id(user_id: str, event_id: str) -> str:
    """Where a refusal goes when it must not touch the request it names: a fresh id in the publisher's own
    namespace, ``<user_id>.rejected-<event_id>`` (``event_id``: the refused message's, when it is a platform
    UUID, so a redelivery lands on the same stream; else a new one)."""
    return f"{user_id}{NAMESPACE_SEPARATOR}rejected-{event_id}"


_digest_encoder: Final = msgspec.json.Encoder()


def request_digest(*, model: str, user_id: str, prompt: str, max_tokens: int) -> str:
    """The request's content, as its claim records it: what the inference and the charge depend on.

    blake2b (128 bits) of the JSON array ``[model, user_id, prompt, max_tokens]``: the same on the
    gateway (which claims at admission) and the worker. Source, trace and timestamps are left out: a
    republished request differs in none of what it asks.
    """
    body = _digest_encoder.encode([model, user_id, prompt, max_tokens])
    return "r:" + hashlib.blake2b(body, digest_size=16).hexdigest()


def message_digest(body: bytes) -> str:
    """The claim's content for a message that is not a readable request (its raw bytes); never equals a
    ``request_digest``."""
    return "m:" + hashlib.blake2b(body, digest_size=16).hexdigest()
