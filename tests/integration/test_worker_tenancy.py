"""Bus tenancy in the worker (issue 14), against the real RabbitMQ, Redis, Postgres and Triton: a message on one
user's routing key can only ever affect that user, one request id runs at most one inference, and the plan's
limits hold for bus requests as they do at the gateway. Events are observed on a test queue (no collector).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import msgspec
import pytest

from events.model import (
    AnyEvent,
    InferenceCompleted,
    InferenceRejected,
    InferenceStarted,
    encode_event,
    new_event_id,
)
from events.topology import requested_routing_key
from ml_service.launcher import TritonProcess
from mlp.settings import Settings
from quota.service import QuotaService
from tests.integration.test_worker import BASIC_QUEUE, publish, quota, wsettings
from tests.integration.test_worker_harness import (
    observed,
    publish_raw,
    requested,
    running_worker,
    triton_inference_count,
    wait_idle,
)
from tests.support.triton import triton_server

pytestmark = pytest.mark.integration
__all__ = ["quota", "triton_server", "wsettings"]  # the fixtures, imported for pytest


def answers_to(request_id: str) -> Callable[[AnyEvent], bool]:
    """Rejections addressed to a publisher about ``request_id`` (on a stream of the publisher's own)."""

    def matches(event: AnyEvent) -> bool:
        return isinstance(event, InferenceRejected) and event.correlation_id == request_id

    return matches


async def set_limits(settings: Settings, user_id: str, **limits: int) -> None:
    columns = ", ".join(limits)
    values = ", ".join(f"${i + 2}" for i in range(len(limits)))
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(
            f"INSERT INTO user_quotas (user_id, plan, {columns}) VALUES ($1, 'free', {values})",
            user_id,
            *limits.values(),
        )
    finally:
        await conn.close()


async def test_an_invalid_message_on_bobs_key_naming_alices_request_cannot_kill_it(wsettings: Settings) -> None:
    # The attack: bob's own routing key, a body claiming alice's request X, no prompt.
    alices = f"alice-t1.job-{new_event_id()}"
    attack = msgspec.json.encode({"type": "InferenceRequested", "request_id": alices, "user_id": "alice-t1"})
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish_raw(wsettings, attack, requested_routing_key("basic-model", "bob-t1"), correlation_id=alices)
        [answer] = await log.matching(answers_to(alices))
        await wait_idle(worker, wsettings, BASIC_QUEUE)
        assert alices not in log.by_request  # nothing was published on alice's request
        # alice's valid X, published later, completes.
        mine = requested(user_id="alice-t1", request_id=alices)
        await publish(wsettings, mine)
        events = await log.terminal(alices)
    assert isinstance(answer, InferenceRejected)
    assert (answer.user_id, answer.reason) == ("bob-t1", "invalid_request")
    assert answer.request_id.startswith("bob-t1.rejected-")
    assert isinstance(events[-1], InferenceCompleted)
    assert {e.user_id for e in events} == {"alice-t1"}


async def test_a_second_tenant_cannot_end_a_request_it_learned_the_uuid_of(wsettings: Settings) -> None:
    alices = requested(user_id="alice-t2")  # a platform UUID request id
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish(wsettings, alices)
        assert isinstance((await log.terminal(alices.request_id))[-1], InferenceCompleted)
        bob_key = requested_routing_key("basic-model", "bob-t2")
        invalid = msgspec.json.encode({"type": "InferenceRequested", "request_id": alices.request_id})
        await publish_raw(wsettings, invalid, bob_key, correlation_id=alices.request_id)
        await publish_raw(wsettings, encode_event(requested(user_id="bob-t2", request_id=alices.request_id)), bob_key)
        answers = await log.matching(answers_to(alices.request_id), count=2)
        await wait_idle(worker, wsettings, BASIC_QUEUE)
    assert sorted(a.reason for a in answers if isinstance(a, InferenceRejected)) == [
        "duplicate_request_id",
        "invalid_request",
    ]
    assert all(a.user_id == "bob-t2" and a.request_id.startswith("bob-t2.rejected-") for a in answers)
    # alice's request kept its one outcome: the platform published nothing more on it (bob's own
    # publish is on the bus too, under the id he named; the collector's guards are tested elsewhere).
    # (InferenceStarted only when the inference outlasted MLP_STARTED_EVENT_AFTER_MS.)
    platform_events = [
        e for e in log.by_request[alices.request_id] if not isinstance(e, (type(alices), InferenceStarted))
    ]
    assert [(type(e), e.user_id) for e in platform_events] == [(InferenceCompleted, "alice-t2")]
    starts = [e for e in log.by_request[alices.request_id] if isinstance(e, InferenceStarted)]
    assert len(starts) <= 1
    assert all(e.user_id == "alice-t2" for e in starts)


async def test_twenty_publishes_of_one_id_with_twenty_prompts_run_one_inference(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    rid = new_event_id()
    owner = requested(user_id="alice-t3", request_id=rid)
    # alice's own second tries (new event_ids, or her first event_id with another prompt) and a second
    # tenant's: one request id, twenty prompts.
    others = [requested(user_id="alice-t3", request_id=rid, prompt=f"alice's other prompt {i}") for i in range(6)]
    others += [msgspec.structs.replace(owner, prompt=f"the same event, prompt {i}") for i in range(6)]
    others += [requested(user_id="bob-t3", request_id=rid, prompt=f"bob's prompt {i}") for i in range(7)]
    before = await triton_inference_count(triton_server.http_url, "basic-model")
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish(wsettings, owner, *others)
        done = await log.terminal(rid)
        answers = await log.matching(answers_to(rid), count=len(others))
        await wait_idle(worker, wsettings, BASIC_QUEUE)
    assert await triton_inference_count(triton_server.http_url, "basic-model") == before + 1
    completed = [e for e in log.by_request[rid] if isinstance(e, InferenceCompleted)]
    assert len(completed) == 1
    assert done[-1] == completed[0]
    assert all(isinstance(a, InferenceRejected) and a.reason == "duplicate_request_id" for a in answers)
    assert {a.user_id for a in answers} == {"alice-t3", "bob-t3"}
    assert all(a.request_id != rid for a in answers)
    assert (await quota.view("alice-t3")).day.used == completed[0].total_tokens
    assert (await quota.view("bob-t3")).day.used == 0


async def test_a_redelivery_of_a_committed_request_is_answered_without_triton(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    request = requested(user_id="again-t4")
    async with observed(wsettings) as log, running_worker(wsettings) as worker:
        await publish(wsettings, request)
        first = (await log.terminal(request.request_id))[-1]
        before = await triton_inference_count(triton_server.http_url, "basic-model")
        # The same message again, as after a worker died between its publish and its ack (no collector
        # runs, so the status cache knows nothing: the claim answers).
        await publish(wsettings, request)
        again = await log.matching(
            lambda e: isinstance(e, InferenceCompleted) and e.request_id == request.request_id, 2
        )
        await wait_idle(worker, wsettings, BASIC_QUEUE)
    assert await triton_inference_count(triton_server.http_url, "basic-model") == before
    assert again == [first, first]  # the same event, republished: same event_id, same completion
    assert sum(isinstance(e, InferenceStarted) for e in log.by_request[request.request_id]) <= 1  # started once
    assert isinstance(first, InferenceCompleted)
    assert (await quota.view("again-t4")).day.used == first.total_tokens


async def test_a_bus_request_over_the_plans_max_tokens_per_request_is_rejected(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    await set_limits(wsettings, "capped-t5", max_tokens_per_request=4)
    over, within = requested(user_id="capped-t5", max_tokens=5), requested(user_id="capped-t5", max_tokens=4)
    before = await triton_inference_count(triton_server.http_url, "basic-model")
    async with observed(wsettings) as log, running_worker(wsettings):
        await publish(wsettings, over)
        rejected = (await log.terminal(over.request_id))[-1]
        after_rejection = await triton_inference_count(triton_server.http_url, "basic-model")
        await publish(wsettings, within)
        assert isinstance((await log.terminal(within.request_id))[-1], InferenceCompleted)
    assert after_rejection == before
    assert isinstance(rejected, InferenceRejected)
    assert rejected.reason == "max_tokens_too_large"  # the gateway's reason (422) and words
    gateway = await quota.admit("capped-t5", 5)
    assert (gateway.limit, gateway.detail) == ("max_tokens_per_request", rejected.detail)


async def test_a_bus_request_over_the_plans_requests_per_minute_is_rejected_with_the_gateways_reason(
    wsettings: Settings, quota: QuotaService, triton_server: TritonProcess
) -> None:
    await set_limits(wsettings, "hasty-t6", requests_per_minute=2)
    requests = [requested(user_id="hasty-t6") for _ in range(3)]
    async with observed(wsettings) as log, running_worker(wsettings):
        for request in requests:  # one after the other: the third is the one over the limit
            await publish(wsettings, request)
            await log.terminal(request.request_id)
    outcomes = [log.by_request[r.request_id][-1] for r in requests]
    assert [type(o) for o in outcomes] == [InferenceCompleted, InferenceCompleted, InferenceRejected]
    rejected = outcomes[2]
    assert isinstance(rejected, InferenceRejected)
    assert rejected.reason == "quota_exceeded"
    assert not any(isinstance(e, InferenceStarted) for e in log.by_request[requests[2].request_id])
    # The gateway, asked now, refuses the same user for the same limit, in the same words.
    gateway = await quota.admit("hasty-t6", 8)
    assert (gateway.allowed, gateway.limit, gateway.detail) == (False, "requests_per_minute", rejected.detail)
