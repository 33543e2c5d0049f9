"""The read API's answers as OpenAPI schemas.

The routes encode ``projections.queries.RequestView`` (msgspec) straight to JSON; these pydantic models
document that JSON (every field is always present, null when unknown) and are checked against the
msgspec structs by a unit test, so the document cannot drift from what is sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from events.status import Status


class ResultOut(BaseModel):
    completion: str


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorOut(BaseModel):
    code: str = Field(description="the failure code, or for a rejection its reason")
    message: str


class RequestOut(BaseModel):
    """One request: its status, and its result, usage or error once it has one."""

    request_id: str
    status: Status
    user_id: str | None
    model: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: ResultOut | None
    usage: UsageOut | None
    error: ErrorOut | None
    reason: str | None = Field(description="a rejection's reason (also in error.code)")
    trace_id: str | None
    queue_position: int | None = Field(
        description="a queued request's place in its model's queue, 1 = next (approximate; null when not queued"
        " or unknown: docs/http.md)"
    )
    eta_s: float | None = Field(
        description="estimated seconds until a queued request starts, at the measured pace (null until measured)"
    )


class RequestPageOut(BaseModel):
    """A page of requests, newest first."""

    items: list[RequestOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class RequestEventsOut(BaseModel):
    """A request's domain events from the event store, in order, each as stored."""

    request_id: str
    events: list[dict[str, Any]] = Field(
        description="InferenceRequested, then InferenceStarted and the outcome (InferenceCompleted with the"
        " tokens charged, InferenceFailed or InferenceRejected), each with its type tag and schema version"
    )
