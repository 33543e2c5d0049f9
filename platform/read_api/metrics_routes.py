"""``GET /api/v1/metrics/token-rate``: tokens per minute, the KEDA metrics-api scaler's input.

``?model=`` narrows it to one model, so each model's worker Deployment scales on its own load.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from events.request_rules import MODEL_NAME_PATTERN
from mlp.http_errors import error_responses
from read_api.deps import PoolDep

router = APIRouter(tags=["metrics"])

# From the ledger (the truth): tokens of requests completed in the last 60 seconds.
_TOKENS_LAST_MINUTE = """
SELECT coalesce(sum(total_tokens), 0)::bigint
FROM token_usage
WHERE occurred_at > now() - interval '60 seconds' AND ($1::text IS NULL OR model = $1)
"""


class TokenRateOut(BaseModel):
    tokens_per_minute: int


@router.get("/api/v1/metrics/token-rate", response_model=TokenRateOut, responses=error_responses(422, 503))
async def token_rate(
    pool: PoolDep,
    model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN)] = None,
) -> dict[str, int]:
    tokens = await pool.fetchval(_TOKENS_LAST_MINUTE, model)
    return {"tokens_per_minute": int(tokens)}
