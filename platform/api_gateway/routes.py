"""HTTP edge of the gateway: translate SubmitService outcomes into status codes."""

from __future__ import annotations

import logging
from typing import Annotated

import msgspec
from fastapi import APIRouter, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from api_gateway.cancel import CancelUnavailable
from api_gateway.deps import CancelDep, GatewayDeps, get_deps
from api_gateway.idempotency import IDEMPOTENCY_KEY_PATTERN
from api_gateway.schemas import InferenceAccepted, InferenceSubmit
from api_gateway.submit import (
    BrokerUnavailable,
    IdempotencyConflict,
    QueueFull,
    QuotaExceeded,
    RequestRefused,
    StateUnavailable,
    TargetUnavailable,
)
from events.request_rules import REQUEST_ID_PATTERN
from mlp import metrics, telemetry
from mlp.http_errors import error_response, error_responses, validation_error
from projections.queries import RequestView
from quota.ledger import QuotaUnavailable
from tenancy.caller import Caller
from tenancy.http import AuthRefused, CallerDep, refusal_response
from webhooks.ssrf import UnsafeTarget

router = APIRouter()
_ENCODER = msgspec.json.Encoder()
log = logging.getLogger(__name__)

_SUBMIT_ERRORS = error_responses(
    400,
    401,
    403,
    409,
    413,
    422,
    429,
    503,
    described={
        403: "the body's user_id is not the API key's user",
        409: "a submit with this Idempotency-Key is in progress; retry after the Retry-After header's seconds",
        422: "invalid input (the detail names the field and the rule), an unknown model, or max_tokens over"
        " the user's plan limit per request",
        429: "the user's quota or request rate is spent; retry after the Retry-After header's seconds",
        503: "the request could not be queued (`queue_full`: the model's queue is at its bound;"
        " `broker_unavailable`) or its quota checked; it was NOT accepted. Retry after the Retry-After"
        " header's seconds",
    },
)


SUBMIT_PATH = "/api/v1/inference"
# A full queue drains at the workers' pace: a few seconds before a retry, not at once.
QUEUE_FULL_RETRY_AFTER_S = 5


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _refused(reason: str, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refused submit: counted by reason (a bounded set: the exception types below), then answered."""
    metrics.REQUESTS_REJECTED.labels(reason=reason).inc()
    return _error(status, error, detail, headers)


def _is_submit(request: Request) -> bool:
    return request.url.path == SUBMIT_PATH and request.method == "POST"


async def count_refused_auth(request: Request, exc: Exception) -> Response:
    """tenancy.http's refusal (no key, a bad key, keys unavailable), counted as a refused submit."""
    assert isinstance(exc, AuthRefused)
    return refused_submit_auth(exc) if _is_submit(request) else refusal_response(exc)


def refused_submit_auth(exc: AuthRefused) -> Response:
    metrics.REQUESTS_REJECTED.labels(reason="auth_unavailable" if exc.status == 503 else exc.error).inc()
    return refusal_response(exc)


async def count_invalid_body(request: Request, exc: Exception) -> Response:
    """The shared 422 for a request that fails validation, counted as a refused submit."""
    assert isinstance(exc, RequestValidationError)
    if _is_submit(request):
        metrics.REQUESTS_REJECTED.labels(reason="invalid_request").inc()
    return await validation_error(request, exc)


@router.post(SUBMIT_PATH, status_code=202, response_model=InferenceAccepted, responses=_SUBMIT_ERRORS)
async def submit_inference(
    request: Request,
    body: InferenceSubmit,
    caller: CallerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="makes a retried submit return the first request's id (kept 24 h, per user):"
            " 1-128 characters of A-Z a-z 0-9 _ - . : @ + / =",
        ),
    ] = None,
) -> Response:
    return await answer_submit(get_deps(request), caller, body, idempotency_key)


async def answer_submit(
    deps: GatewayDeps, caller: Caller, body: InferenceSubmit, idempotency_key: str | None
) -> Response:
    """A validated, authenticated submit's answer: of this route, and of api_gateway.submit_fast_path."""
    service, settings, webhooks = deps.submit, deps.settings, deps.webhooks
    user_id = caller.submits_as(body.user_id)
    if user_id is None:  # never let one user spend another's quota
        return _refused("forbidden", 403, "forbidden", "user_id in the body does not match the API key's user")
    if body.webhook_url is not None:
        try:
            await webhooks.guard.check(body.webhook_url)
        except UnsafeTarget as exc:
            return _refused("invalid_webhook_url", 422, "invalid_request", f"webhook_url: {exc}")
    try:
        accepted = await service.submit(
            user_id=user_id,
            model=body.model,
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            idempotency_key=idempotency_key,
            trace_id=telemetry.current_trace_id(),
            traceparent=telemetry.current_traceparent(),
            timeout_s=body.timeout_s,
            webhook_url=body.webhook_url,
        )
    except RequestRefused as exc:  # counted by the rule's reason: unknown_model, prompt_too_large, ...
        return _refused(exc.rejection.reason, 422, "invalid_request", exc.rejection.message)
    except QuotaExceeded as exc:
        if exc.admission.limit == "max_tokens_per_request":  # waiting will not help: a client error
            return _refused("max_tokens_too_large", 422, "invalid_request", exc.admission.detail)
        metrics.QUOTA_REJECTIONS.labels(model=body.model, stage="gateway").inc()  # served: checked before
        retry = str(max(1, exc.admission.retry_after_s))
        error = f"quota_exceeded:{exc.admission.limit}"
        return _refused("quota_exceeded", 429, error, exc.admission.detail, {"Retry-After": retry})
    except IdempotencyConflict as exc:
        return _refused("idempotency_conflict", 409, "idempotency_conflict", str(exc), {"Retry-After": "1"})
    except QueueFull as exc:  # the broker's nack: the bound (docs/bus.md, "Backpressure"), not an outage
        detail = (
            f"the request queue of model {exc.model} is full (at most {settings.max_queued_per_model} queued);"
            " the request was not accepted, retry later"
        )
        headers = {"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
        return _refused("queue_full", 503, "queue_full", detail, headers)
    except BrokerUnavailable:
        detail = "the request could not be queued; it was not accepted"
        return _refused("publish_failed", 503, "broker_unavailable", detail, {"Retry-After": "5"})
    except TargetUnavailable as exc:
        log.warning("submit refused, the webhook target could not be recorded: %r", exc)
        detail = "the request's webhook_url could not be recorded now; the request was not accepted"
        return _refused("webhook_unavailable", 503, "dependency_unavailable", detail, {"Retry-After": "5"})
    except (QuotaUnavailable, StateUnavailable) as exc:  # quota cannot be checked (Redis down or rebuilding)
        log.warning("submit refused, quota unavailable: %r", exc)
        detail = "the quota could not be checked now; the request was not accepted"
        return _refused("quota_unavailable", 503, "dependency_unavailable", detail, {"Retry-After": "5"})
    if not accepted.replayed:  # an Idempotency-Key replay is the same request, counted once
        metrics.REQUESTS_ACCEPTED.labels(model=body.model).inc()
    base = settings.public_base_url.rstrip("/")
    # The InferenceAccepted body (its schema documents it), encoded once with msgspec: a returned Response
    # skips FastAPI's response-model validation and serialization round trip on the hot path.
    body_out = {
        "request_id": accepted.request_id,
        "status": "queued",
        "status_url": f"{base}/api/v1/inference/{accepted.request_id}",
    }
    return Response(_ENCODER.encode(body_out), status_code=202, media_type="application/json")


CANCEL_PATH = "/api/v1/inference/{request_id}/cancel"


def _view_response(view: RequestView, status: int) -> Response:
    return Response(_ENCODER.encode(view), status_code=status, media_type="application/json")


@router.post(
    CANCEL_PATH,
    status_code=202,
    response_class=Response,
    responses={
        202: {
            "description": "the cancel is accepted: the request's view, as GET /api/v1/inference/{request_id}"
            " answers it (status `cancelled` when it was still queued: it never runs and nothing is charged;"
            " `running` when its worker was told to cancel its Triton call: it then ends `cancelled`, or"
            " `completed` if Triton answered first). A second cancel answers the same (idempotent)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **error_responses(
            401,
            404,
            409,
            422,
            503,
            described={
                404: "no such request, or another user's (the two are not told apart)",
                409: "the request already ended otherwise (completed, failed, rejected or expired):"
                " error `not_cancellable`",
                503: "the cancel could not be recorded or confirmed now; retry (a cancel is idempotent)",
            },
        ),
    },
)
async def cancel_inference(
    request_id: Annotated[str, Path(pattern=REQUEST_ID_PATTERN, description="the request id the submit answered")],
    service: CancelDep,
    caller: CallerDep,
) -> Response:
    try:
        outcome = await service.cancel(request_id, caller, traceparent=telemetry.current_traceparent())
    except (CancelUnavailable, QuotaUnavailable) as exc:
        log.warning("cancel of %s not done: %r", request_id, exc)
        detail = "the cancel could not be recorded now; retry (a cancel is idempotent)"
        return error_response(503, "dependency_unavailable", detail, {"Retry-After": "1"})
    match outcome.answer:
        case "accepted":
            assert outcome.view is not None
            return _view_response(outcome.view, 202)
        case "not_cancellable":
            status = outcome.view.status if outcome.view is not None else "ended"
            return error_response(409, "not_cancellable", f"request {request_id} already ended ({status})")
    return error_response(404, "not_found", f"no request {request_id}")
