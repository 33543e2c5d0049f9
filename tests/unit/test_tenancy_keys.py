"""The pure part of API keys: format, hash, validity, durations, the pepper rule, the bootstrap list, the Caller."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from pydantic import SecretStr

from mlp.settings import Settings
from tenancy.caller import OPEN, Caller
from tenancy.keys import (
    DEVELOPMENT_PEPPER,
    MAX_GRACE,
    AuthNotConfigured,
    BootstrapKey,
    InvalidKeyInput,
    KeyRecord,
    hash_key,
    key_id_of,
    key_id_or_key,
    new_key,
    parse_bootstrap_keys,
    parse_duration,
    pepper_of,
    same_hash,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
PEPPER = b"p" * 32


def _record(**changes: object) -> KeyRecord:
    fields: dict[str, object] = {
        "key_id": "0123456789ab",
        "user_id": "alice",
        "scope": "user",
        "key_hash": b"h" * 32,
        "created_at": NOW - timedelta(days=1),
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def test_a_new_key_has_the_public_id_as_its_visible_prefix_and_a_long_secret() -> None:
    issued = new_key()
    assert issued.plaintext == f"mlp_{issued.key_id}_{issued.secret}"
    assert key_id_of(issued.plaintext) == issued.key_id
    assert len(issued.key_id) == 12
    assert len(issued.secret) >= 43  # 32 random bytes, URL-safe base64
    assert new_key().plaintext != issued.plaintext


@pytest.mark.parametrize("text", ["k-alice", "mlp_0123456789ab", "mlp_0123456789AB_" + "x" * 43, "mlp__" + "x" * 43])
def test_anything_else_is_not_a_stored_key(text: str) -> None:
    assert key_id_of(text) is None


def test_the_hash_depends_on_the_pepper_and_is_not_the_key() -> None:
    key = new_key().plaintext
    digest = hash_key(PEPPER, key)
    assert len(digest) == 32
    assert key.encode() not in digest
    assert same_hash(digest, hash_key(PEPPER, key))
    assert not same_hash(digest, hash_key(b"q" * 32, key))
    assert not same_hash(digest, hash_key(PEPPER, key + "x"))


def test_validity_expiry_revocation_and_the_rotation_grace() -> None:
    assert _record().refusal(NOW) is None
    assert _record().state(NOW) == "active"
    expiring = _record(expires_at=NOW + timedelta(hours=1))
    assert expiring.refusal(NOW) is None
    assert "expired" in str(expiring.refusal(NOW + timedelta(hours=1)))
    assert expiring.state(NOW + timedelta(hours=2)) == "expired"
    assert "revoked" in str(_record(revoked_at=NOW).refusal(NOW))
    rotated = _record(revoked_at=NOW + timedelta(hours=24), replaced_by="ba9876543210")
    assert rotated.refusal(NOW + timedelta(hours=23)) is None
    assert rotated.state(NOW) == "grace"
    assert "grace period ended" in str(rotated.refusal(NOW + timedelta(hours=24)))
    assert rotated.ends_at() == NOW + timedelta(hours=24)
    assert _record(expires_at=NOW, revoked_at=NOW + timedelta(1)).ends_at() == NOW
    assert _record().ends_at() is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90d", timedelta(days=90)), ("24h", timedelta(hours=24)), ("30m", timedelta(minutes=30)), ("2w", timedelta(14))],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text, maximum=timedelta(days=3650)) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "1y", "-1d", "1.5h", "31d", "0s"])
def test_bad_durations_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(InvalidKeyInput):
        parse_duration(text, maximum=MAX_GRACE)


def test_a_zero_grace_is_allowed_where_asked_for() -> None:
    assert parse_duration("0s", maximum=MAX_GRACE, allow_zero=True) == timedelta(0)


def test_revoke_accepts_a_key_id_or_the_key_itself() -> None:
    issued = new_key()
    assert key_id_or_key(issued.key_id) == issued.key_id
    assert key_id_or_key(issued.plaintext) == issued.key_id
    with pytest.raises(InvalidKeyInput, match="MLP_API_KEYS"):
        key_id_or_key("k-alice")


def test_bootstrap_keys_name_a_user_and_optionally_the_admin_scope() -> None:
    assert parse_bootstrap_keys(" k1=alice , k2=ops:team/admin,") == [
        BootstrapKey("k1", "alice", "user"),
        BootstrapKey("k2", "ops:team", "admin"),
    ]
    assert parse_bootstrap_keys("") == []


@pytest.mark.parametrize("raw", ["k1", "=alice", "k1=", "k1=al.ice", "k1=alice/root", "k1=a,k1=b"])
def test_bad_bootstrap_lists_are_refused(raw: str) -> None:
    with pytest.raises(InvalidKeyInput):
        parse_bootstrap_keys(raw)


def test_development_has_a_fixed_pepper_production_needs_a_real_one() -> None:
    assert pepper_of(Settings(environment="development")) == DEVELOPMENT_PEPPER.encode()
    assert pepper_of(Settings(environment="test", key_pepper=SecretStr("x" * 40))) == b"x" * 40
    with pytest.raises(AuthNotConfigured, match="MLP_KEY_PEPPER"):
        pepper_of(Settings(environment="production"))
    with pytest.raises(AuthNotConfigured, match="at least 32"):
        pepper_of(Settings(environment="production", key_pepper=SecretStr("short")))
    with pytest.raises(AuthNotConfigured, match="development pepper"):
        pepper_of(Settings(environment="production", key_pepper=SecretStr(DEVELOPMENT_PEPPER)))
    assert pepper_of(Settings(environment="production", key_pepper=SecretStr("r" * 64))) == b"r" * 64


def test_a_placeholder_pepper_is_refused_outside_development() -> None:
    with pytest.raises(pydantic.ValidationError, match="MLP_KEY_PEPPER"):
        Settings(environment="production", key_pepper=SecretStr("changeme-key-pepper"))


def test_the_auth_cache_bound_is_at_most_30_seconds() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(auth_cache_ttl_s=31)


def test_what_each_caller_sees_and_submits_as() -> None:
    alice = Caller(user_id="alice", scope="user", key_id="0123456789ab")
    admin = Caller(user_id="ops", scope="admin", key_id="ba9876543210")
    assert alice.may_see_user("alice")
    assert not alice.may_see_user("bob")
    assert admin.may_see_user("bob")
    assert OPEN.may_see_user("bob")
    assert (alice.submits_as("alice"), alice.submits_as("bob")) == ("alice", None)
    assert admin.submits_as("bob") == "bob"
    assert OPEN.submits_as("bob") == "bob"
