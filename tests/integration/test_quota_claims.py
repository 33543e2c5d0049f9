"""The request's claim in the quota scripts, against the real Redis and Postgres (docs/bus.md, "Request identity").

One request id runs at most one inference: the first message that names it claims it (owner, event_id,
content digest); a redelivery is recognised, another message is a conflict; an ended request answers
with the outcome it ended with; the plan's limits hold for bus requests, counted once for gateway ones.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as redis

from events.identity import RequestClaim, claim_of
from events.model import InferenceCompleted, InferenceRequested, encode_event, new_event_id, utc_now
from events.request_rules import Rejection
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings, Reservation
from tests.integration.test_quota_ledger import Clock, flush_quota_keys, with_limits
from tests.support.ledger import charge_ledger

pytestmark = pytest.mark.integration


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2030, 5, 20, 12, 0, tzinfo=UTC))


@pytest.fixture
def quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated), clock)


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def requested(who: str, **changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": new_event_id(),
        "request_id": f"{who}.job-{uuid.uuid4().hex[:8]}",
        "occurred_at": utc_now(),
        "user_id": who,
        "model": "basic-model",
        "prompt": "hello there",
        "max_tokens": 8,
        "source": "bus",
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


async def reserve(
    quota: QuotaService,
    request: InferenceRequested,
    *,
    refusal: Rejection | None = None,
    status_key: str | None = None,
) -> Reservation:
    """The worker's reservation of a bus request (claim, plan ceiling, requests per minute)."""
    return await quota.reserve(
        request.request_id,
        request.user_id,
        len(request.prompt) + request.max_tokens,
        claim=claim_of(request),
        refusal=refusal,
        max_tokens=request.max_tokens,
        count_request=True,
        status_key=status_key,
    )


def completed(request: InferenceRequested) -> InferenceCompleted:
    return InferenceCompleted(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        user_id=request.user_id,
        model=request.model,
        completion="an answer",
        prompt_tokens=2,
        completion_tokens=3,
        latency_ms=1.0,
    )


async def test_the_first_message_claims_the_id_and_only_its_redelivery_is_the_same_request(
    quota: QuotaService,
) -> None:
    alice, bob = user(), user()
    rid = new_event_id()
    first = requested(alice, request_id=rid)
    assert (await reserve(quota, first)).answer == "run"
    assert (await reserve(quota, first)).answer == "run"  # a redelivery: the live hold is reused
    assert (await quota.view(alice)).day.reserved == len(first.prompt) + first.max_tokens

    # Another tenant, the same owner with another event, the same event with another prompt: conflicts.
    others = [
        requested(bob, request_id=rid),
        requested(alice, request_id=rid),
        requested(alice, request_id=rid, event_id=first.event_id, prompt="a different prompt"),
    ]
    for other in others:
        answer = await reserve(quota, other)
        assert (answer.answer, answer.granted, answer.reserved_tokens) == ("conflict", False, 0)
    assert (await quota.view(bob)).day.reserved == 0  # a conflict reserves nothing
    assert (await quota.view(alice)).day.reserved == len(first.prompt) + first.max_tokens


async def test_a_committed_request_answers_with_its_outcome_and_is_never_run_again(quota: QuotaService) -> None:
    who = user()
    request = requested(who)
    assert (await reserve(quota, request)).answer == "run"
    outcome = completed(request)
    await quota.commit(request.request_id, outcome.total_tokens, user_id=who, outcome=encode_event(outcome))

    again = await reserve(quota, request)
    assert (again.answer, again.committed) == ("done", True)
    assert again.outcome_event == encode_event(outcome)  # republished as it was: the same event_id
    # A commit of the collector afterwards keeps the first outcome; another message is still a conflict.
    await quota.commit(request.request_id, 999, user_id=who, outcome=b'{"other": true}')
    assert (await reserve(quota, request)).outcome_event == encode_event(outcome)
    assert (await reserve(quota, requested(who, request_id=request.request_id))).answer == "conflict"
    view = await quota.view(who)
    assert (view.day.used, view.day.reserved) == (outcome.total_tokens, 0)


async def test_a_failed_request_answers_with_its_failure(quota: QuotaService) -> None:
    who = user()
    request = requested(who)
    assert (await reserve(quota, request)).answer == "run"
    released = await quota.release(request.request_id, outcome=b'{"failed": 1}', user_id=who, claim=claim_of(request))
    assert released.outcome == "released"
    again = await reserve(quota, request)
    assert (again.answer, again.outcome_event) == ("done", b'{"failed": 1}')
    assert (await quota.view(who)).day.reserved == 0
    # Ending a request the message does not own is refused.
    other = requested(user(), request_id=request.request_id)
    assert (await quota.release(request.request_id, user_id=other.user_id, claim=claim_of(other))).outcome == "conflict"


async def test_a_failure_before_any_reservation_claims_the_request(quota: QuotaService) -> None:
    who = user()
    request = requested(who)
    released = await quota.release(request.request_id, outcome=b'{"failed": 2}', user_id=who, claim=claim_of(request))
    assert released.outcome == "released"
    assert (await reserve(quota, request)).outcome_event == b'{"failed": 2}'
    assert (await reserve(quota, requested(user(), request_id=request.request_id))).answer == "conflict"


async def test_the_gateways_admission_claims_its_request_and_counts_it_once(
    quota: QuotaService, pool: asyncpg.Pool
) -> None:
    who = user()
    await with_limits(pool, who, requests_per_minute=2)
    gateway = requested(who, request_id=new_event_id(), source="http")
    assert (await quota.admit(who, 8, 19, request_id=gateway.request_id, claim=claim_of(gateway))).allowed
    # Before the worker gets to it, nobody else can claim it: not another tenant, not another message.
    assert (await reserve(quota, requested(user(), request_id=gateway.request_id))).answer == "conflict"
    assert (await reserve(quota, requested(who, request_id=gateway.request_id))).answer == "conflict"
    # The worker's reservation of the admitted request is not counted again in the minute's window ...
    assert (await reserve(quota, gateway)).answer == "run"
    # ... so one bus request still fits (2 per minute), and the next is refused as the gateway refuses it.
    assert (await reserve(quota, requested(who))).answer == "run"
    refused = await reserve(quota, requested(who))
    assert (refused.answer, refused.limit) == ("refused", "requests_per_minute")
    assert refused.rejection == Rejection("quota_exceeded", "2 requests per minute allowed on the free plan")
    gateway_refusal = await quota.admit(who, 8)
    assert (gateway_refusal.limit, gateway_refusal.detail) == ("requests_per_minute", refused.rejection.message)


async def test_the_window_forgets_after_a_minute_and_a_refused_request_stays_refused(
    quota: QuotaService, pool: asyncpg.Pool, clock: Clock
) -> None:
    who = user()
    await with_limits(pool, who, requests_per_minute=1)
    assert (await reserve(quota, requested(who))).answer == "run"
    late = requested(who)
    assert (await reserve(quota, late)).limit == "requests_per_minute"
    clock.advance(seconds=61)
    assert (await reserve(quota, requested(who))).answer == "run"
    # The refused one ended (its rejection was published): a redelivery is refused again, not run.
    again = await reserve(quota, late)
    assert (again.answer, again.limit) == ("refused", "requests_per_minute")


async def test_the_plans_max_tokens_per_request_holds_for_bus_requests(quota: QuotaService, pool: asyncpg.Pool) -> None:
    who = user()
    await with_limits(pool, who, max_tokens_per_request=100)
    big = requested(who, max_tokens=101)
    refused = await reserve(quota, big)
    assert refused.answer == "refused"
    # The gateway's rule, reason and words (events.request_rules.check_max_tokens_per_request).
    assert refused.rejection == Rejection(
        "max_tokens_too_large", "max_tokens 101 exceeds the free plan's limit of 100 per request"
    )
    assert (await quota.admit(who, 101)).detail == refused.rejection.message
    assert (await reserve(quota, requested(who, max_tokens=100))).answer == "run"
    assert (await quota.view(who)).day.reserved == len(big.prompt) + 100  # the refused one reserved nothing


async def test_a_request_rule_refusal_is_recorded_in_the_claim(quota: QuotaService) -> None:
    who = user()
    request = requested(who)
    rule = Rejection("prompt_too_large", "prompt has 11 characters; the limit is 5")
    first = await reserve(quota, request, refusal=rule)
    assert (first.answer, first.rejection) == ("refused", rule)
    assert (await reserve(quota, request, refusal=rule)).rejection == rule  # a redelivery: the same answer
    assert (await reserve(quota, request)).answer == "refused"  # whatever the caller says now, it ended refused
    assert (await reserve(quota, requested(user(), request_id=request.request_id))).answer == "conflict"


async def test_refuse_claims_the_id_unless_another_request_holds_it(quota: QuotaService) -> None:
    alice, bob = user(), user()
    held = requested(alice)
    assert (await reserve(quota, held)).answer == "run"
    rejection = Rejection("invalid_request", "not a valid InferenceRequested")
    mark = RequestClaim("", "m:" + "0" * 32)
    assert (await quota.refuse(held.request_id, bob, mark, rejection)).answer == "conflict"
    assert (await quota.refuse(held.request_id, alice, mark, rejection)).answer == "conflict"  # another message
    fresh = new_event_id()
    assert (await quota.refuse(fresh, bob, mark, rejection)).answer == "refused"
    assert (await quota.refuse(fresh, bob, mark, rejection)).answer == "refused"  # its redelivery
    # The id is bob's now, refused: a valid request under it later is not the same message.
    assert (await reserve(quota, requested(bob, request_id=fresh))).answer == "conflict"


async def test_without_a_claim_record_the_status_cache_still_names_the_owner(
    quota: QuotaService, client: redis.Redis, migrated: Settings
) -> None:
    alice, bob = user(), user()
    rid = new_event_id()
    await StatusCache(client, StatusKeys(migrated.redis_prefix)).advance(rid, "queued", {"user_id": alice})
    status_key = StatusKeys(migrated.redis_prefix).status(rid)
    assert (await reserve(quota, requested(bob, request_id=rid), status_key=status_key)).answer == "conflict"
    assert (await reserve(quota, requested(alice, request_id=rid), status_key=status_key)).answer == "run"


async def test_the_rebuild_keeps_the_claim_of_committed_requests(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    who = user()
    request = requested(who)
    assert (await reserve(quota, request)).answer == "run"
    await quota.commit(request.request_id, 5, user_id=who, outcome=encode_event(completed(request)))
    await charge_ledger(pool, [(request.request_id, who, 5, clock.now)])
    await flush_quota_keys(client, migrated)  # Redis lost everything; the ledger rebuilds it

    again = await reserve(quota, request)
    # The ledger keeps no outcome: the request is done, never run again (its outcome is in the event store).
    assert (again.answer, again.committed, again.outcome_event) == ("done", True, None)
    assert (await reserve(quota, requested(user(), request_id=request.request_id))).answer == "conflict"
    assert (await quota.view(who)).day.used == 5
