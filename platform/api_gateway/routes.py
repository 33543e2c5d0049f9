"""HTTP edge of the gateway: translate SubmitService outcomes into status codes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from api_gateway.auth import AuthError, resolve_user
from api_gateway.schemas import ErrorBody, InferenceAccepted, InferenceSubmit
from api_gateway.submit import (
    BrokerUnavailable,
    IdempotencyConflict,
    InputTooLarge,
    QuotaExceeded,
    SubmitService,
    UnknownModel,
)
from mlp import telemetry

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"description": "invalid input"},
    429: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@router.post("/api/v1/inference", status_code=202, response_model=InferenceAccepted, responses=_ERRORS)
async def submit_inference(
    body: InferenceSubmit,
    request: Request,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> InferenceAccepted | JSONResponse:
    service: SubmitService = request.app.state.submit
    presented = x_api_key or (authorization.removeprefix("Bearer ").strip() if authorization else None)
    try:
        user_id = resolve_user(request.app.state.api_keys, presented, body.user_id)
        accepted = await service.submit(
            user_id=user_id,
            model=body.model,
            prompt=body.prompt,
            max_tokens=body.max_tokens,
            idempotency_key=idempotency_key,
            trace_id=telemetry.current_trace_id(),
            traceparent=telemetry.current_traceparent(),
        )
    except AuthError as exc:
        return _error(exc.status, "unauthorized" if exc.status == 401 else "forbidden", exc.detail)
    except (UnknownModel, InputTooLarge) as exc:
        return _error(422, "invalid_request", str(exc))
    except QuotaExceeded as exc:
        if exc.admission.limit == "max_tokens_per_request":  # waiting will not help: a client error
            return _error(422, "invalid_request", exc.admission.detail)
        retry = str(max(1, exc.admission.retry_after_s))
        return _error(429, f"quota_exceeded:{exc.admission.limit}", exc.admission.detail, {"Retry-After": retry})
    except IdempotencyConflict as exc:
        return _error(409, "idempotency_conflict", str(exc), {"Retry-After": "1"})
    except BrokerUnavailable:
        return _error(
            503,
            "broker_unavailable",
            "the request could not be queued; it was not accepted",
            {"Retry-After": "5"},
        )
    base = request.app.state.settings.public_base_url.rstrip("/")
    return InferenceAccepted(
        request_id=accepted.request_id, status_url=f"{base}/api/v1/inference/{accepted.request_id}"
    )
