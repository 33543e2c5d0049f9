"""Webhook endpoints over HTTP (docs/http.md "Webhooks"). A webhook belongs to the caller's user: another
user's answers 404 (as another user's request does); an admin key (and open mode) sees everyone's.

  POST   /api/v1/webhooks                      register {"url", "events"?}; the response holds the secret, once
  GET    /api/v1/webhooks[?user_id=]           the caller's webhooks (never a secret)
  GET    /api/v1/webhooks/signing-secret       the signing secret of one-off `webhook_url` deliveries
  GET    /api/v1/webhooks/{id}                 one webhook
  DELETE /api/v1/webhooks/{id}                 remove it (its pending deliveries stop)
  GET    /api/v1/webhooks/{id}/deliveries      its delivery log, newest first
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from api_gateway.deps import WebhooksDep
from api_gateway.schemas import UserId
from events.request_rules import IDENTIFIER_PATTERN
from mlp.http_errors import error_response, error_responses
from tenancy.caller import Caller
from tenancy.http import CallerDep
from webhooks import store
from webhooks.rules import DELIVERED_TYPES, DeliveryState, unknown_types
from webhooks.ssrf import MAX_URL_CHARS, UnsafeTarget

router = APIRouter(tags=["webhooks"])

WebhookId = Annotated[str, Path(pattern=store.WEBHOOK_ID_PATTERN, description="the webhook's id (wh_ + 24 hex)")]
_ERRORS = error_responses(
    400,
    401,
    403,
    404,
    422,
    503,
    described={
        403: "user_id names another user than the API key's",
        404: "no such webhook (or another user's)",
        422: "invalid input: a URL that is not http(s), too long, or resolves to a refused address (private,"
        " loopback, link-local, metadata); an unknown event type; the user's webhook limit reached",
    },
)


# The schema names the types; the route's own check words the 422 (unknown_types).
EventTypeName = Annotated[str, Field(json_schema_extra={"enum": list(DELIVERED_TYPES)})]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_URL_CHARS,
            description="http or https, a public address",
            json_schema_extra={"pattern": "^[Hh][Tt][Tt][Pp][Ss]?://"},  # the scheme; the address is checked
        ),
    ]
    events: Annotated[list[EventTypeName], Field(min_length=1, max_length=len(DELIVERED_TYPES))] | None = Field(
        default=None, description=f"the event types to deliver (default: all of {', '.join(DELIVERED_TYPES)})"
    )
    user_id: UserId | None = Field(default=None, description="whose webhook (admin keys only; default: the key's user)")


class WebhookOut(BaseModel):
    id: str
    user_id: str
    url: str
    events: list[str]
    created_at: datetime

    @classmethod
    def of(cls, webhook: store.Webhook) -> WebhookOut:
        return cls(
            id=webhook.webhook_id,
            user_id=webhook.user_id,
            url=webhook.url,
            events=list(webhook.events),
            created_at=webhook.created_at,
        )


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the signing secret (whsec_<base64>); shown only here, store it now")


class WebhookList(BaseModel):
    items: list[WebhookOut]


class SigningSecret(BaseModel):
    user_id: str
    secret: str = Field(description="signs the deliveries to a submit's one-off webhook_url (whsec_<base64>)")


class DeliveryOut(BaseModel):
    delivery_id: int
    event_id: str = Field(description="also the deliveries' webhook-id header")
    event_type: str
    request_id: str
    state: DeliveryState
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def of(cls, d: store.Delivery) -> DeliveryOut:
        return cls(
            delivery_id=d.delivery_id,
            event_id=d.event_id,
            event_type=d.event_type,
            request_id=d.request_id,
            state=d.state,
            attempts=d.attempts,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            next_attempt_at=d.next_attempt_at,
            last_attempt_at=d.last_attempt_at,
            created_at=d.created_at,
            delivered_at=d.delivered_at,
        )


class DeliveryList(BaseModel):
    items: list[DeliveryOut]


def _owner(caller: Caller, user_id: str | None) -> str | JSONResponse:
    """Whose webhook a write concerns: the key's user; an admin (or open mode) may name another."""
    if user_id is None:
        if caller.user_id is None:
            return error_response(422, "invalid_request", "user_id is required without an API key (open mode)")
        return caller.user_id
    owner = caller.submits_as(user_id)
    if owner is None:
        return error_response(403, "forbidden", "user_id does not match the API key's user")
    return owner


def _not_found(webhook_id: str) -> JSONResponse:
    return error_response(404, "not_found", f"no webhook {webhook_id}")


async def _visible(webhooks: WebhooksDep, caller: Caller, webhook_id: str) -> store.Webhook | None:
    found = await store.get_webhook(webhooks.pool, webhook_id)
    return found if found is not None and caller.may_see_user(found.user_id) else None


@router.post("/api/v1/webhooks", status_code=201, response_model=WebhookCreated, responses=_ERRORS)
async def create_webhook(
    body: WebhookCreate, caller: CallerDep, webhooks: WebhooksDep
) -> WebhookCreated | JSONResponse:
    owner = _owner(caller, body.user_id)
    if isinstance(owner, JSONResponse):
        return owner
    events = list(dict.fromkeys(body.events)) if body.events is not None else list(DELIVERED_TYPES)
    unknown = unknown_types(events)
    if unknown:
        detail = f"unknown event types {', '.join(unknown)}; one of {', '.join(DELIVERED_TYPES)}"
        return error_response(422, "invalid_request", detail[:500])
    try:
        await webhooks.guard.check(body.url)
        webhook, secret = await store.create_webhook(
            webhooks.pool, owner, body.url, events, max_per_user=webhooks.max_per_user
        )
    except UnsafeTarget as exc:
        return error_response(422, "invalid_request", f"url: {exc}")
    except store.WebhookLimitReached as exc:
        return error_response(422, "invalid_request", str(exc))
    return WebhookCreated(secret=secret, **WebhookOut.of(webhook).model_dump())


@router.get("/api/v1/webhooks", response_model=WebhookList, responses=_ERRORS)
async def list_webhooks(
    caller: CallerDep,
    webhooks: WebhooksDep,
    user_id: Annotated[str | None, Query(pattern=IDENTIFIER_PATTERN, description="admin keys: one user's")] = None,
) -> WebhookList:
    whose = user_id if caller.is_admin else caller.user_id
    return WebhookList(items=[WebhookOut.of(w) for w in await store.list_webhooks(webhooks.pool, whose)])


@router.get("/api/v1/webhooks/signing-secret", response_model=SigningSecret, responses=_ERRORS)
async def signing_secret(
    caller: CallerDep,
    webhooks: WebhooksDep,
    user_id: Annotated[str | None, Query(pattern=IDENTIFIER_PATTERN, description="admin keys: another user's")] = None,
) -> SigningSecret | JSONResponse:
    owner = _owner(caller, user_id)
    if isinstance(owner, JSONResponse):
        return owner
    return SigningSecret(user_id=owner, secret=await store.user_signing_secret(webhooks.pool, owner))


@router.api_route("/api/v1/webhooks/signing-secret", methods=["DELETE"], include_in_schema=False)
async def signing_secret_other_methods() -> JSONResponse:
    # Without it a DELETE here would reach DELETE /api/v1/webhooks/{webhook_id} and answer its id's 422.
    return JSONResponse(
        {"error": "method_not_allowed", "detail": "the signing secret is read (GET) only"},
        status_code=405,
        headers={"Allow": "GET"},
    )


@router.get("/api/v1/webhooks/{webhook_id}", response_model=WebhookOut, responses=_ERRORS)
async def get_webhook(webhook_id: WebhookId, caller: CallerDep, webhooks: WebhooksDep) -> WebhookOut | JSONResponse:
    found = await _visible(webhooks, caller, webhook_id)
    return _not_found(webhook_id) if found is None else WebhookOut.of(found)


@router.delete("/api/v1/webhooks/{webhook_id}", response_model=WebhookOut, responses=_ERRORS)
async def delete_webhook(webhook_id: WebhookId, caller: CallerDep, webhooks: WebhooksDep) -> WebhookOut | JSONResponse:
    found = await _visible(webhooks, caller, webhook_id)
    if found is None or not await store.delete_webhook(webhooks.pool, webhook_id):
        return _not_found(webhook_id)
    return WebhookOut.of(found)


@router.get("/api/v1/webhooks/{webhook_id}/deliveries", response_model=DeliveryList, responses=_ERRORS)
async def list_deliveries(
    webhook_id: WebhookId,
    caller: CallerDep,
    webhooks: WebhooksDep,
    state: DeliveryState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> DeliveryList | JSONResponse:
    if await _visible(webhooks, caller, webhook_id) is None:
        return _not_found(webhook_id)
    found = await store.webhook_deliveries(webhooks.pool, webhook_id, state=state, limit=limit)
    return DeliveryList(items=[DeliveryOut.of(d) for d in found])
