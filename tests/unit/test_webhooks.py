"""The pure parts of webhooks: the SSRF guard, Standard Webhooks signatures, the retry schedule, settings."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from events.model import TERMINAL_EVENTS
from events.topology import EVENT_KINDS, OUTCOME_KINDS, webhook_binding_keys, webhooks_queue
from mlp.backoff import Backoff
from mlp.settings import Settings
from webhooks import signing
from webhooks.rules import DELIVERED_TYPES, RetryPolicy, after_attempt, unknown_types
from webhooks.ssrf import TargetGuard, UnsafeTarget, address_refusal, literal_address, parse_target

REFUSED = [
    "127.0.0.1",
    "127.1.2.3",
    "::1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "fd00:ec2::254",
    "fe80::1",
    "0.0.0.0",
    "::",
    "224.0.0.1",
    "ff02::1",
    "100.64.0.1",
    "240.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:0001::",  # 6to4 of 127.0.0.1
    "fc00::1",
    "198.18.0.1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    parsed = literal_address(address)
    assert parsed is not None
    assert address_refusal(parsed) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    parsed = literal_address(address)
    assert parsed is not None
    assert address_refusal(parsed) is None


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://example.com",
        "http://",
        "http://user:pw@example.com/",
        "http://example.com:0/",
        "http://exa mple.com/",
        "https://example.com/" + "a" * 2100,
        "javascript:alert(1)",
        "HTtp://`\x8f",  # found by schemathesis: the resolver's IDNA encoding raised, a 500
        "https://b\u00fccher.example/",  # an internationalized name: its punycode form is asked for
        "http://under_score.example/",
    ],
)
def test_malformed_or_disallowed_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        parse_target(url)


def _resolver(answers: dict[str, Sequence[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> Sequence[str]:
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    return resolve


@pytest.mark.parametrize("url", ["http://127.0.0.1", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/x"])
async def test_the_guard_refuses_literal_private_targets_by_default(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        await TargetGuard(allow_private=False, resolver=_resolver({})).check(url)


async def test_the_guard_refuses_a_name_when_any_of_its_addresses_is_private() -> None:
    guard = TargetGuard(
        allow_private=False,
        resolver=_resolver({"mixed.test": ["93.184.215.14", "10.1.2.3"], "public.test": ["93.184.215.14"]}),
    )
    with pytest.raises(UnsafeTarget, match=r"10\.1\.2\.3"):
        await guard.check("https://mixed.test/hook")
    with pytest.raises(UnsafeTarget, match="does not resolve"):
        await guard.check("https://unknown.test/hook")
    assert await guard.check("https://public.test/hook") == "https://public.test/hook"


async def test_allowing_private_targets_still_checks_the_form() -> None:
    guard = TargetGuard(allow_private=True, resolver=_resolver({}))
    assert await guard.check("http://127.0.0.1:9/x") == "http://127.0.0.1:9/x"
    with pytest.raises(UnsafeTarget):
        await guard.check("ftp://127.0.0.1/")


def _spec_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks, written out independently of webhooks.signing."""
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, msg_id.encode() + b"." + str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_signatures_follow_the_standard_webhooks_spec() -> None:
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    body = b'{"type":"InferenceCompleted","event_id":"e1"}'
    headers = signing.headers(secret, "msg_1", 1_700_000_000, body)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"] == _spec_signature(secret, "msg_1", 1_700_000_000, body)
    assert signing.verify(secret, "msg_1", 1_700_000_000, body, "v1,bogus " + headers["webhook-signature"])
    assert not signing.verify(secret, "msg_1", 1_700_000_001, body, headers["webhook-signature"])


def test_the_spec_example_signature() -> None:
    # The example of the Standard Webhooks specification (spec/standard-webhooks.md, "Signature scheme").
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert signing.signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == expected


def test_subscribable_types_are_the_terminal_events() -> None:
    assert set(DELIVERED_TYPES) == {t.__name__ for t in TERMINAL_EVENTS}
    assert unknown_types(["InferenceCompleted", "InferenceStarted", "Nope"]) == ["InferenceStarted", "Nope"]


def test_the_webhooks_queue_is_bound_per_user_to_every_outcome_kind() -> None:
    assert webhooks_queue().binding_keys == ()  # declared unbound: the dispatcher binds it per user
    assert tuple(EVENT_KINDS[t] for t in TERMINAL_EVENTS) == OUTCOME_KINDS
    assert webhook_binding_keys("alice") == tuple(f"inference.{k}.*.alice" for k in OUTCOME_KINDS)


@pytest.mark.parametrize("user_id", ["", "a.b", "*", "#", "a b", "x" * 129])
def test_a_binding_key_is_never_made_of_a_non_identifier(user_id: str) -> None:
    with pytest.raises(ValueError, match="not a user id"):
        webhook_binding_keys(user_id)


def test_retries_back_off_for_the_whole_window_then_fail() -> None:
    policy = RetryPolicy(Backoff(base_s=5, cap_s=3600, jitter=0.5), timedelta(hours=24))
    created = datetime(2026, 1, 1, tzinfo=UTC)
    now, attempts, delays = created, 0, []
    rng_state = random.getstate()
    random.seed(7)
    try:
        while True:
            attempts += 1
            outcome = after_attempt(ok=False, attempts=attempts, created_at=created, now=now, policy=policy)
            if outcome.state == "failed":
                break
            assert outcome.state == "pending"
            assert outcome.next_attempt_at is not None
            delays.append((outcome.next_attempt_at - now).total_seconds())
            now = outcome.next_attempt_at
    finally:
        random.setstate(rng_state)
    assert now - created >= timedelta(hours=24)  # tried for the whole window, never less
    assert 2.5 <= delays[0] <= 5  # jittered: within [ceiling/2, ceiling]
    assert max(delays) <= 3600
    assert delays[5] > delays[0]  # exponential growth
    done = after_attempt(ok=True, attempts=3, created_at=created, now=now, policy=policy)
    assert (done.state, done.next_attempt_at) == ("delivered", None)


def test_production_refuses_private_webhook_targets_and_a_short_retry_window() -> None:
    pepper = "p" * 40
    with pytest.raises(ValidationError, match="MLP_WEBHOOK_ALLOW_PRIVATE"):
        Settings(environment="production", key_pepper=pepper, webhook_allow_private=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="24 h"):
        Settings(environment="production", key_pepper=pepper, webhook_retry_window_s=60)  # type: ignore[arg-type]
    assert Settings(environment="test", webhook_allow_private=True).webhook_allow_private
