"""Signed webhooks against the real RabbitMQ and Postgres: the gateway's routes in-process, the dispatcher
in-process (and as a real process for kill -9), a receiver on 127.0.0.1 (MLP_WEBHOOK_ALLOW_PRIVATE=true
where deliveries are tested; the default guard where refusals are)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import asyncpg
import httpx
import pytest
from faststream.rabbit import RabbitBroker

from api_gateway.main import create_app
from events.model import TERMINAL_EVENTS, Event, InferenceCompleted, InferenceFailed, new_event_id, utc_now
from events.topology import EVENTS_EXCHANGE, WEBHOOKS_QUEUE, webhook_binding_keys
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from ops import webhooks as webhooks_cli
from projections.postgres import store_events
from tests.support.apps import running
from tests.support.isolation import broker_admin, isolated_namespace
from tests.support.queues import drain_requests
from tests.support.services import free_port
from tests.support.waiting import eventually
from tests.support.webhook_receiver import Received, WebhookReceiver
from webhook_dispatcher.main import build_app
from webhook_dispatcher.sender import Sender, http_client
from webhooks import signing
from webhooks import store as webhook_store
from webhooks.rules import DELIVERED_TYPES
from webhooks.ssrf import TargetGuard
from webhooks.store import DueDelivery

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer k-ops-admin"}
ALICE = {"Authorization": "Bearer k-alice"}
BOB = {"Authorization": "Bearer k-bob"}
FAST = {
    "webhook_allow_private": True,
    "webhook_backoff_base_s": 0.2,
    "webhook_backoff_cap_s": 1.0,
    "webhook_timeout_s": 2.0,
    "webhook_poll_interval_s": 0.1,
    "webhook_retry_window_s": 3600.0,
    "webhook_resync_s": 1.0,
    "webhook_target_scan_s": 0.2,
}


def spec_verify(secret: str, received: Received) -> bool:
    """Standard Webhooks verification, written out here independently of webhooks.signing."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, timestamp = received.headers["webhook-id"], received.headers["webhook-timestamp"]
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + received.body, hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    return any(
        hmac.compare_digest(sig.split(",", 1)[1], expected)
        for sig in received.headers["webhook-signature"].split()
        if sig.startswith("v1,")
    )


def completed(user_id: str, request_id: str | None = None) -> InferenceCompleted:
    return InferenceCompleted(
        event_id=new_event_id(),
        request_id=request_id or new_event_id(),
        occurred_at=utc_now(),
        user_id=user_id,
        model="basic-model",
        completion="hello",
        prompt_tokens=2,
        completion_tokens=3,
        latency_ms=1.0,
    )


def a_user() -> str:
    return "u" + uuid.uuid4().hex[:12]


@dataclass
class Stack:
    settings: Settings
    gateway: httpx.AsyncClient
    publisher: EventPublisher
    pool: asyncpg.Pool

    async def register(self, user_id: str, url: str, events: list[str] | None = None) -> dict[str, str]:
        body: dict[str, object] = {"url": url, "user_id": user_id}
        if events is not None:
            body["events"] = events
        response = await self.gateway.post("/api/v1/webhooks", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        created: dict[str, str] = response.json()
        await eventually(lambda: self.is_bound(user_id), "the user's outcome keys bound (the change notified)")
        return created

    async def is_bound(self, user_id: str) -> bool:
        """The dispatcher records a binding after making it (webhook_bindings)."""
        return bool(await self.pool.fetchval("SELECT count(*) FROM webhook_bindings WHERE user_id = $1", user_id))

    def binding_keys(self) -> set[str]:
        vhost = unquote(urlsplit(self.settings.rabbitmq_url).path.removeprefix("/")) or "/"
        return broker_admin().queue_binding_keys(vhost, WEBHOOKS_QUEUE, EVENTS_EXCHANGE)

    async def store(self, *events: Event) -> None:
        """Append to the event store as the collector does (no collector runs here)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await store_events(conn, events)

    async def deliveries(self, webhook_id: str) -> list[dict[str, object]]:
        response = await self.gateway.get(f"/api/v1/webhooks/{webhook_id}/deliveries", headers=ADMIN)
        assert response.status_code == 200, response.text
        items: list[dict[str, object]] = response.json()["items"]
        return items


async def _ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(url, timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
async def keyed(module_settings: Settings) -> Settings:
    return module_settings.model_copy(
        update={"api_keys": "k-alice=alice,k-bob=bob,k-ops-admin=ops/admin", "webhook_max_per_user": 3}
    )


@pytest.fixture(scope="module")
async def stack(keyed: Settings) -> AsyncIterator[Stack]:
    settings = keyed.model_copy(update={**FAST, "dispatcher_health_port": free_port()})
    consumer = build_app(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.serve(stop))
    broker: RabbitBroker = make_broker(settings, app_id="test-publisher")
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        ready_url = f"http://{settings.health_host}:{settings.dispatcher_health_port}/readyz"

        async def ready() -> bool:
            if task.done():
                task.result()
            return await _ready(ready_url)

        await eventually(ready, "dispatcher ready")
        await broker.connect()
        await declare_topology(broker, settings.models)
        async with running(create_app(settings)) as gateway:
            yield Stack(settings, gateway, EventPublisher(broker, timeout_s=5), pool)
    finally:
        stop.set()
        await task
        await broker.stop()
        await pool.close()


@pytest.fixture
def receiver() -> AsyncIterator[WebhookReceiver]:  # type: ignore[misc]
    r = WebhookReceiver().start()
    yield r
    r.stop()


# --- routes ----------------------------------------------------------------------------------------


async def test_a_webhook_belongs_to_its_user_another_sees_404_an_admin_sees_all(keyed: Settings) -> None:
    settings = keyed.model_copy(update={"webhook_allow_private": True})
    async with running(create_app(settings)) as api:
        made = await api.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/a"}, headers=ALICE)
        assert made.status_code == 201, made.text
        hook = made.json()
        assert hook["id"].startswith("wh_")
        assert hook["secret"].startswith("whsec_")
        assert len(base64.b64decode(hook["secret"].removeprefix("whsec_"))) == 32
        assert hook["events"] == [
            "InferenceCompleted",
            "InferenceFailed",
            "InferenceRejected",
            "InferenceCancelled",
            "InferenceExpired",
        ]
        assert hook["user_id"] == "alice"
        path = f"/api/v1/webhooks/{hook['id']}"

        mine = await api.get(path, headers=ALICE)
        assert mine.status_code == 200
        assert "secret" not in mine.json()  # shown once, at creation
        assert all("secret" not in w for w in (await api.get("/api/v1/webhooks", headers=ALICE)).json()["items"])
        assert (await api.get(path, headers=BOB)).status_code == 404
        assert (await api.get(f"{path}/deliveries", headers=BOB)).status_code == 404
        assert (await api.delete(path, headers=BOB)).status_code == 404
        assert hook["id"] not in {w["id"] for w in (await api.get("/api/v1/webhooks", headers=BOB)).json()["items"]}
        assert hook["id"] in {w["id"] for w in (await api.get("/api/v1/webhooks", headers=ADMIN)).json()["items"]}
        assert (await api.get(path, headers=ADMIN)).status_code == 200
        # A user key cannot register for another user; an admin can.
        other = await api.post(
            "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/b", "user_id": "bob"}, headers=ALICE
        )
        assert other.status_code == 403

        assert (await api.delete(path, headers=ALICE)).status_code == 200
        assert (await api.get(path, headers=ALICE)).status_code == 404


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"url": "ftp://example.com/x"}, "scheme"),
        ({"url": "http://example.com/" + "a" * 2100}, "url"),
        ({"url": "http://127.0.0.1:9/", "events": ["InferenceStarted"]}, "unknown event types"),
        ({"url": "http://127.0.0.1:9/", "events": []}, "events"),
        ({"url": "http://127.0.0.1:9/", "secret": "mine"}, "secret"),
    ],
)
async def test_bad_registrations_answer_422(keyed: Settings, body: dict[str, object], needle: str) -> None:
    async with running(create_app(keyed.model_copy(update={"webhook_allow_private": True}))) as api:
        response = await api.post("/api/v1/webhooks", json=body, headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert needle in response.json()["detail"]


async def test_the_webhook_cap_per_user(keyed: Settings) -> None:
    user = a_user()
    async with running(create_app(keyed.model_copy(update={"webhook_allow_private": True}))) as api:
        for i in range(keyed.webhook_max_per_user):
            made = await api.post(
                "/api/v1/webhooks", json={"url": f"http://127.0.0.1:9/{i}", "user_id": user}, headers=ADMIN
            )
            assert made.status_code == 201, made.text
        over = await api.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "user_id": user}, headers=ADMIN)
    assert over.status_code == 422
    assert "limit" in over.json()["detail"]


@pytest.mark.parametrize("url", ["http://127.0.0.1", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/"])
async def test_private_targets_are_refused_by_default_at_registration_and_submit(keyed: Settings, url: str) -> None:
    assert not keyed.webhook_allow_private
    async with running(create_app(keyed)) as api:
        await drain_requests(keyed)
        registered = await api.post("/api/v1/webhooks", json={"url": url}, headers=ALICE)
        assert registered.status_code == 422, registered.text
        assert "must be public" in registered.json()["detail"]
        submit = {"prompt": "p", "user_id": "alice", "model": "basic-model", "webhook_url": url}
        submitted = await api.post("/api/v1/inference", json=submit, headers=ALICE)
        assert submitted.status_code == 422, submitted.text
        assert "webhook_url" in submitted.json()["detail"]
        assert await drain_requests(keyed) == []  # nothing was accepted


# --- deliveries ------------------------------------------------------------------------------------


async def test_deliveries_are_signed_with_the_published_secret_and_filtered(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    user, other = a_user(), a_user()
    hook = await stack.register(user, receiver.url)
    only_failed = await stack.register(user, receiver.url + "?failed", events=["InferenceFailed"])
    await stack.register(other, receiver.url + "?other")
    event = completed(user)
    await stack.publisher.publish(event)
    await stack.publisher.publish(completed(other))

    await eventually(lambda: _async(len(receiver.delivered()) >= 2), "two deliveries")
    mine = [r for r in receiver.delivered() if r.headers["webhook-id"] == event.event_id]
    assert len(mine) == 1
    got = mine[0]
    assert spec_verify(hook["secret"], got)
    assert not spec_verify(only_failed["secret"], got)
    assert got.headers["content-type"] == "application/json"
    assert json.loads(got.body)["type"] == "InferenceCompleted"
    assert json.loads(got.body)["request_id"] == event.request_id
    assert abs(int(got.headers["webhook-timestamp"]) - int(utc_now().timestamp())) < 600
    log = await stack.deliveries(hook["id"])
    assert [(d["event_id"], d["state"], d["attempts"], d["last_status_code"]) for d in log] == [
        (event.event_id, "delivered", 1, 200)
    ]
    assert await stack.deliveries(only_failed["id"]) == []  # subscribed to InferenceFailed only

    failed = InferenceFailed(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id=user,
        model="basic-model",
        error_code="model_error",
    )
    await stack.publisher.publish(failed)
    await eventually(
        lambda: _async(sum(r.headers["webhook-id"] == failed.event_id for r in receiver.delivered()) == 2),
        "the failure to both of the user's webhooks",
    )


async def _async(value: bool) -> bool:
    return value


async def test_a_receiver_answering_500_gets_a_retry_with_the_same_webhook_id(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    user = a_user()
    hook = await stack.register(user, receiver.url)
    receiver.answers.extend([500, 503])
    event = completed(user)
    await stack.publisher.publish(event)
    await eventually(lambda: _async(len(receiver.delivered()) == 1), "delivered after two failures")
    attempts = receiver.all()
    assert [r.answered for r in attempts] == [500, 503, 200]
    assert {r.headers["webhook-id"] for r in attempts} == {event.event_id}
    assert len({r.body for r in attempts}) == 1
    assert all(spec_verify(hook["secret"], r) for r in attempts)
    (logged,) = await stack.deliveries(hook["id"])
    assert (logged["state"], logged["attempts"], logged["last_status_code"]) == ("delivered", 3, 200)


async def test_a_receiver_down_for_a_while_gets_everything_afterwards(stack: Stack) -> None:
    user = a_user()
    receiver = WebhookReceiver(port=free_port())  # not listening yet
    hook = await stack.register(user, receiver.url)
    events = [completed(user) for _ in range(5)]
    await stack.publisher.publish_many(events)

    async def all_tried_and_failing() -> bool:
        log = await stack.deliveries(hook["id"])
        return len(log) == 5 and all(
            d["state"] == "pending" and int(str(d["attempts"])) >= 2 and d["last_error"] for d in log
        )

    await eventually(all_tried_and_failing, "every delivery attempted while the receiver is down")
    receiver.start()
    try:
        await eventually(lambda: _async(len(receiver.delivered()) == 5), "all five once it is up", deadline_s=90)
        assert {r.headers["webhook-id"] for r in receiver.delivered()} == {e.event_id for e in events}
        assert all(spec_verify(hook["secret"], r) for r in receiver.delivered())
    finally:
        receiver.stop()


async def test_a_submits_one_off_webhook_url_is_signed_with_the_users_signing_secret(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    submit = {"prompt": "p", "user_id": "alice", "model": "basic-model", "webhook_url": receiver.url + "?once"}
    accepted = await stack.gateway.post("/api/v1/inference", json=submit, headers=ALICE)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["request_id"]
    (published,) = [e for e in await drain_requests(stack.settings) if e.request_id == request_id]
    assert published.webhook_url == receiver.url + "?once"  # on the event, add-only
    secret = (await stack.gateway.get("/api/v1/webhooks/signing-secret", headers=ALICE)).json()["secret"]
    assert secret.startswith("whsec_")
    assert (await stack.gateway.get("/api/v1/webhooks/signing-secret", headers=ALICE)).json()["secret"] == secret

    outcome, second = completed("alice", request_id), completed("alice", request_id)
    # No bus: the target scan finds the outcome in the event store, which keeps a request's first outcome
    # only (a second one, a redelivery, is never delivered).
    await stack.store(outcome, second)

    def once() -> list[Received]:
        return [r for r in receiver.delivered() if json.loads(r.body)["request_id"] == request_id]

    await eventually(lambda: _async(len(once()) == 1), "the one-off delivery")
    assert once()[0].headers["webhook-id"] in {outcome.event_id, second.event_id}  # whichever came first
    rows = await stack.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE request_id = $1", request_id)
    assert rows == 1
    assert spec_verify(secret, once()[0])

    async def listed_delivered() -> bool:
        # The receiver counts the 200 when it answers; the dispatcher logs it only once the answer is back.
        listed = await asyncio.to_thread(_cli, stack.settings, "list", "--user", "alice", "--json")
        rows = [json.loads(line) for line in listed.splitlines()]
        return [(r["webhook_id"], r["state"]) for r in rows if r["request_id"] == request_id] == [(None, "delivered")]

    await eventually(listed_delivered, "`mlp webhooks list` shows the one-off delivery delivered")


def _cli(settings: Settings, *argv: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = webhooks_cli.main(list(argv), settings)
    assert code == 0, out.getvalue()
    return out.getvalue()


async def test_mlp_webhooks_replay_redrives_failed_deliveries(stack: Stack, receiver: WebhookReceiver) -> None:
    user = a_user()
    hook = await stack.register(user, receiver.url)
    receiver.answers.extend([500] * 1000)  # the receiver is broken ...
    event = completed(user)
    await stack.publisher.publish(event)

    async def tried() -> bool:
        log = await stack.deliveries(hook["id"])
        return bool(log) and int(str(log[0]["attempts"])) >= 1 and log[0]["last_status_code"] == 500

    await eventually(tried, "a failing attempt")
    # ... until the dispatcher gives up (the retry window spent: here moved into the past)
    await stack.pool.execute(
        "UPDATE webhook_deliveries SET retry_from = now() - interval '2 days' WHERE webhook_id = $1", hook["id"]
    )

    async def failed() -> bool:
        return [d["state"] for d in await stack.deliveries(hook["id"])] == ["failed"]

    await eventually(failed, "marked failed once the window is spent")
    listed = await asyncio.to_thread(_cli, stack.settings, "list", "--state", "failed", "--webhook", hook["id"])
    assert event.event_id in listed
    receiver.answers.clear()  # ... then fixed
    out = await asyncio.to_thread(_cli, stack.settings, "replay", "--webhook", hook["id"])
    assert "re-queued 1" in out
    await eventually(lambda: _async(len(receiver.delivered()) == 1), "delivered after the replay")
    assert receiver.delivered()[0].headers["webhook-id"] == event.event_id

    async def logged_delivered() -> bool:
        return [d["state"] for d in await stack.deliveries(hook["id"])] == ["delivered"]

    await eventually(logged_delivered, "the replayed delivery logged as delivered")


async def test_a_redirect_is_not_followed_and_a_hanging_endpoint_holds_up_no_other(stack: Stack) -> None:
    user = a_user()
    slow, redirecting = WebhookReceiver().start(), WebhookReceiver().start()
    try:
        slow.hold_from = 0  # never answers while held: each attempt runs into the timeout
        redirecting.answers.append(302)
        await stack.register(user, slow.url)
        hook = await stack.register(user, redirecting.url)
        event = completed(user)
        await stack.publisher.publish(event)
        await eventually(lambda: _async(len(redirecting.delivered()) == 1), "delivered beside the hanging endpoint")
        assert [r.answered for r in redirecting.all()] == [302, 200]  # the 302 was a failed attempt, not followed
        await eventually(lambda: _async(slow.hung.is_set()), "the hanging endpoint was called too")

        async def logged_delivered() -> bool:
            # The receiver counts the 200 when it answers; the dispatcher logs it only once the answer is back.
            return [(d["state"], d["attempts"]) for d in await stack.deliveries(hook["id"])] == [("delivered", 2)]

        await eventually(logged_delivered, "the delivery logged as delivered after two attempts")
    finally:
        slow.stop()
        redirecting.stop()


async def test_the_guard_runs_again_at_delivery_time(receiver: WebhookReceiver) -> None:
    """A target that passed at registration (say, its DNS changed since) is refused before the call."""
    async with http_client(2.0) as client:
        sender = Sender(client, TargetGuard(allow_private=False), timeout_s=2.0, max_response_bytes=1024)
        due = DueDelivery(1, 1, receiver.url, new_event_id(), b"{}", signing.new_secret(), utc_now())
        result = await sender.attempt(due)
    assert result.status_code is None
    assert result.error is not None
    assert "refused target" in result.error
    assert receiver.all() == []


async def test_a_submit_refused_as_queue_full_leaves_no_webhook_target(keyed: Settings) -> None:
    """The refused request's queue_full rejection still reaches the outcome queues (docs/bus.md); with its
    one-off target removed before that rejection is published, it calls no webhook."""
    import os

    from ops.rabbitmq_policy import apply_requests_bound
    from tests.support.rabbitmq_admin import MANAGEMENT_URL_VARIABLE

    with isolated_namespace("whq") as ns:
        settings = keyed.model_copy(
            update={
                "rabbitmq_url": ns.rabbitmq_url,
                "redis_prefix": ns.redis_prefix,
                "webhook_allow_private": True,
                "max_queued_per_model": 1,
                "rabbitmq_management_url": os.environ.get(MANAGEMENT_URL_VARIABLE, ""),
            }
        )
        user = a_user()
        body = {"prompt": "p", "user_id": user, "model": "basic-model", "webhook_url": "http://127.0.0.1:9/q"}
        async with running(create_app(settings)) as api:
            apply_requests_bound(settings)
            accepted: list[str] = []

            async def refused() -> bool:
                response = await api.post("/api/v1/inference", json=body, headers=ADMIN)
                if response.status_code == 202:
                    accepted.append(response.json()["request_id"])
                    return False
                assert response.status_code == 503, response.text
                assert response.json()["error"] == "queue_full"
                return True

            await eventually(refused, "a submit past the bound (the policy applies within moments)")
        pool = await asyncpg.connect(settings.postgres_dsn)
        try:
            targets = await pool.fetch("SELECT request_id FROM webhook_request_targets WHERE user_id = $1", user)
        finally:
            await pool.close()
        assert sorted(r["request_id"] for r in targets) == sorted(accepted)  # the refused one left none


# --- per-user bindings: a user without webhooks costs the dispatcher nothing ---------------------------


async def test_a_user_without_webhooks_has_no_binding_their_outcomes_never_reach_the_queue(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    without, with_hook = a_user(), a_user()
    hook = await stack.register(with_hook, receiver.url)
    keys = stack.binding_keys()
    assert set(webhook_binding_keys(with_hook)) <= keys
    assert not any(k.endswith("." + without) for k in keys)
    assert not any(k.endswith(".#") for k in keys)  # no catch-all binding (nor an earlier version's)
    assert all(k.split(".")[-1] != "*" for k in keys)  # every key names one user

    ignored, wanted = completed(without), completed(with_hook)
    await stack.publisher.publish(ignored)
    await stack.publisher.publish(wanted)
    await eventually(lambda: _async(len(receiver.delivered()) == 1), "the subscribed user's outcome delivered")
    assert [d["event_id"] for d in await stack.deliveries(hook["id"])] == [wanted.event_id]
    assert not await stack.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE user_id = $1", without)


async def test_creating_a_webhook_binds_its_user_deleting_the_last_one_unbinds(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    user = a_user()
    assert not set(webhook_binding_keys(user)) & stack.binding_keys()
    first = await stack.register(user, receiver.url)
    second = await stack.register(user, receiver.url + "?second")
    assert set(webhook_binding_keys(user)) <= stack.binding_keys()

    assert (await stack.gateway.delete(f"/api/v1/webhooks/{first['id']}", headers=ADMIN)).status_code == 200
    await stack.publisher.publish(event := completed(user))  # still bound: the other webhook gets it
    await eventually(lambda: _async(len(receiver.delivered()) == 1), "delivered to the remaining webhook")
    assert receiver.delivered()[0].headers["webhook-id"] == event.event_id
    assert set(webhook_binding_keys(user)) <= stack.binding_keys()

    assert (await stack.gateway.delete(f"/api/v1/webhooks/{second['id']}", headers=ADMIN)).status_code == 200

    async def unbound() -> bool:
        return not await stack.is_bound(user) and not set(webhook_binding_keys(user)) & stack.binding_keys()

    await eventually(unbound, "the user's keys unbound once their last webhook is gone")


async def test_an_outcome_published_before_the_binding_is_delivered_from_the_event_store(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    """The race: a webhook created, an outcome published before the dispatcher bound the user (so the queue
    never saw it). Simulated without any notification: the webhook row and the stored outcome inserted
    directly; the periodic resync binds the user and enqueues the outcome from the event store."""
    user = a_user()
    secret = signing.new_secret()
    webhook_id = "wh_" + uuid.uuid4().hex[:24]
    await stack.pool.execute(
        "INSERT INTO webhooks (webhook_id, user_id, url, events, secret) VALUES ($1, $2, $3, $4, $5)",
        webhook_id,
        user,
        receiver.url,
        list(DELIVERED_TYPES),
        secret,
    )
    missed = completed(user)
    await stack.store(missed)  # the collector stored it; the webhooks queue was not bound for it

    await eventually(lambda: _async(len(receiver.delivered()) == 1), "delivered after the resync")
    got = receiver.delivered()[0]
    assert got.headers["webhook-id"] == missed.event_id
    assert spec_verify(secret, got)
    assert await stack.is_bound(user)
    assert set(webhook_binding_keys(user)) <= stack.binding_keys()

    # Once bound, the bus carries the user's outcomes; the catch-up never enqueues one twice.
    await stack.publisher.publish(live := completed(user))
    await eventually(lambda: _async(len(receiver.delivered()) == 2), "the next outcome over the bus")
    assert sorted(r.headers["webhook-id"] for r in receiver.delivered()) == sorted([missed.event_id, live.event_id])
    rows = await stack.pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", webhook_id)
    assert rows == 2


async def test_a_one_off_target_is_delivered_by_the_scan_and_then_forgotten(
    stack: Stack, receiver: WebhookReceiver
) -> None:
    user = a_user()  # no registered webhook: nothing of this user is bound
    request_id = new_event_id()
    await webhook_store.remember_target(stack.pool, request_id, user, receiver.url + "?scan")
    secret = await webhook_store.user_signing_secret(stack.pool, user)
    outcome = completed(user, request_id)
    await stack.store(outcome)
    await eventually(lambda: _async(len(receiver.delivered()) == 1), "the one-off delivery by the target scan")
    assert receiver.delivered()[0].headers["webhook-id"] == outcome.event_id
    assert spec_verify(secret, receiver.delivered()[0])
    assert not await stack.is_bound(user)
    assert not await stack.pool.fetchval(
        "SELECT count(*) FROM webhook_request_targets WHERE request_id = $1", request_id
    )


async def test_the_catch_up_index_covers_every_terminal_event_type(stack: Stack) -> None:
    definition = await stack.pool.fetchval(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'event_store_outcomes_by_user'"
    )
    assert definition is not None
    assert all(f"'{t.__name__}'" in definition for t in TERMINAL_EVENTS), definition
