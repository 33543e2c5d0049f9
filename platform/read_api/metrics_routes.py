"""``GET /api/v1/metrics/token-rate``: tokens per minute, the KEDA metrics-api scaler's input."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()

# From the ledger (the truth): tokens of requests completed in the last 60 seconds.
_TOKENS_LAST_MINUTE = """
SELECT coalesce(sum(total_tokens), 0)::bigint
FROM token_usage
WHERE occurred_at > now() - interval '60 seconds'
"""


@router.get("/api/v1/metrics/token-rate")
async def token_rate(request: Request) -> dict[str, int]:
    tokens = await request.app.state.pool.fetchval(_TOKENS_LAST_MINUTE)
    return {"tokens_per_minute": int(tokens)}
