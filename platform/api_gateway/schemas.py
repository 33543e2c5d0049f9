"""The submit contract: what a client may send, and what it gets back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from events.control import MAX_TIMEOUT_S
from events.request_rules import (
    IDENTIFIER_PATTERN,
    MIN_MAX_TOKENS,
    MIN_PROMPT_CHARS,
    MODEL_NAME_PATTERN,
    check_prompt_text,
)
from mlp.http_errors import ErrorBody as ErrorBody  # the shared error body, where the gateway's routes name it
from mlp.settings import Settings
from quota.plans import DEFAULT_MAX_TIMEOUT_S
from webhooks.ssrf import MAX_URL_CHARS

# The request rules' alphabets and bounds (events.request_rules), so the OpenAPI document shows them.
UserId = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
# Hard ceiling of the body schema; the configured limits are checked by SubmitService (check_request).
PROMPT_HARD_LIMIT = 1_000_000


class InferenceSubmit(BaseModel):
    """``POST /api/v1/inference`` body. The seed's request works verbatim."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=MIN_PROMPT_CHARS, max_length=PROMPT_HARD_LIMIT)]
    user_id: UserId
    model: ModelName
    max_tokens: Annotated[int, Field(ge=MIN_MAX_TOKENS)] | None = None
    timeout_s: (
        Annotated[
            float,
            Field(
                gt=0,
                le=MAX_TIMEOUT_S,
                description="seconds from acceptance after which the request ends `expired` unless finished"
                " (never run if still queued; its Triton call cancelled if running; never charged); at most the"
                " user's plan's max_timeout_s. Default: the plan's default_timeout_s (usually none)",
            ),
        ]
        | None
    ) = None
    # A one-off webhook of this request's outcome, signed with the user's signing secret
    # (GET /api/v1/webhooks/signing-secret); SSRF-checked here (docs/http.md "Webhooks").
    webhook_url: (
        Annotated[
            str,
            Field(min_length=1, max_length=MAX_URL_CHARS, json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"}),
        ]
        | None
    ) = None

    @field_validator("prompt")
    @classmethod
    def _storable(cls, prompt: str) -> str:
        # The NUL rule answers here, in the body's own 422, like the other field errors (fault test 6).
        rejection = check_prompt_text(prompt)
        if rejection is not None:
            raise ValueError(rejection.message)
        return prompt


class InferenceAccepted(BaseModel):
    request_id: str
    status: Literal["queued"] = "queued"
    status_url: str


# Postgres text cannot hold U+0000 (the validator above refuses it); the schema says so as a pattern.
NO_NUL_PATTERN = "^[^\\u0000]*$"


def document_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Complete the OpenAPI document with the submit's configured constraints: the served models as an
    enum, the prompt's and max_tokens' limits. Pure (edits ``schema`` in place)."""
    submit = schema["components"]["schemas"]["InferenceSubmit"]["properties"]
    submit["model"]["enum"] = list(settings.models)
    submit["model"]["description"] = "one of the served models (MLP_MODELS)"
    submit["prompt"]["maxLength"] = settings.max_prompt_chars
    submit["prompt"]["pattern"] = NO_NUL_PATTERN
    for branch in submit["max_tokens"].get("anyOf", [submit["max_tokens"]]):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_tokens_limit
    # The plan's bound (quota_plans.max_timeout_s, per user) as the default plan's usual one: a plan with
    # another bound answers by it (a lower one is a documented 422, like max_tokens over a plan's limit).
    for branch in submit["timeout_s"].get("anyOf", [submit["timeout_s"]]):
        if branch.get("type") == "number":
            branch["maximum"] = DEFAULT_MAX_TIMEOUT_S
    submit["max_tokens"]["description"] = (
        f"tokens to generate at most (default {settings.default_max_tokens}); the user's plan may allow fewer"
    )
