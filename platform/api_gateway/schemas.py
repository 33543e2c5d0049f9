"""The submit contract: what a client may send, and what it gets back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from mlp.http_errors import ErrorBody as ErrorBody  # the shared error body, where the gateway's routes name it
from mlp.settings import Settings

# Same alphabets as the events (events.model.Identifier / ModelName): ids travel in routing keys and URLs.
UserId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-:@]{1,128}$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
# Hard ceiling of the body schema; the configured limit (settings.max_prompt_chars) is checked in the route.
PROMPT_HARD_LIMIT = 1_000_000


class InferenceSubmit(BaseModel):
    """``POST /api/v1/inference`` body. The seed's request works verbatim."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Annotated[str, Field(min_length=1, max_length=PROMPT_HARD_LIMIT)]
    user_id: UserId
    model: ModelName
    max_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("prompt")
    @classmethod
    def _no_nul(cls, prompt: str) -> str:
        # Postgres text/jsonb cannot hold U+0000: the event could never be stored (fault test 6).
        if "\x00" in prompt:
            raise ValueError("prompt must not contain NUL characters (U+0000)")
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
    submit["max_tokens"]["description"] = (
        f"tokens to generate at most (default {settings.default_max_tokens}); the user's plan may allow fewer"
    )
