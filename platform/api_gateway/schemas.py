"""The submit contract: what a client may send, and what it gets back."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

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
