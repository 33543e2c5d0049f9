"""API keys, the pure part: the key format, its peppered hash, validity, durations and the bootstrap list.

A key reads ``mlp_<key id>_<secret>``: the key id (12 hex characters) is public (lists, logs, the
``mlp keys`` commands); the secret (32 random bytes, URL-safe base64) never leaves the response that
created it. The store keeps only ``HMAC-SHA256(pepper, key)``: the pepper (``MLP_KEY_PEPPER``, a Secret)
lives outside the database, so a copy of the table authenticates nobody.

No I/O here: the store (``tenancy.key_store``) and the authenticator (``tenancy.authenticator``) use it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from events.request_rules import IDENTIFIER
from mlp.settings import ConfigurationError, Settings

KeyScope = Literal["user", "admin"]
SCOPES: Final[tuple[KeyScope, ...]] = ("user", "admin")
KeyState = Literal["active", "grace", "revoked", "expired"]

KEY_ID_PATTERN: Final = r"^[0-9a-f]{12}$"
KEY_ID: Final = re.compile(KEY_ID_PATTERN)
_KEY: Final = re.compile(r"^mlp_([0-9a-f]{12})_([A-Za-z0-9_\-]{32,128})$")
_SECRET_BYTES: Final = 32

# Development and test only: a fixed pepper, so `mlp up` works without configuration. Production
# refuses it (and a missing or placeholder one): whoever reads this file could forge nothing with it
# anyway without the database, but production keys must not depend on a published value.
DEVELOPMENT_PEPPER: Final = "mlp-development-pepper-not-a-secret"
MIN_PEPPER_CHARS: Final = 32
_PLACEHOLDERS: Final = ("changeme", "change-me", "placeholder", "<", "${")

MAX_LIFETIME: Final = timedelta(days=3650)
MAX_GRACE: Final = timedelta(days=30)
DEFAULT_GRACE: Final = timedelta(hours=24)


class InvalidKeyInput(ValueError):
    """A user id, scope, duration or key id that cannot be used; the message says what is expected."""


class AuthNotConfigured(ConfigurationError):
    """The service cannot authenticate (production without a usable pepper, no key table): it must not start."""


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly made key: its plaintext is shown once, then only its hash exists."""

    key_id: str
    secret: str

    @property
    def plaintext(self) -> str:
        return f"mlp_{self.key_id}_{self.secret}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored key (its hash, never the key)."""

    key_id: str
    user_id: str
    scope: KeyScope
    key_hash: bytes
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    replaced_by: str | None = None

    def ends_at(self) -> datetime | None:
        """When the key stops working (the earlier of expiry and revocation), None: never."""
        ends = [t for t in (self.expires_at, self.revoked_at) if t is not None]
        return min(ends) if ends else None

    def refusal(self, now: datetime) -> str | None:
        """Why the key does not work at ``now``, None when it does."""
        if self.revoked_at is not None and self.revoked_at <= now:
            if self.replaced_by is not None:
                return f"API key {self.key_id} was rotated; its grace period ended at {self.revoked_at.isoformat()}"
            return f"API key {self.key_id} was revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return f"API key {self.key_id} expired at {self.expires_at.isoformat()}"
        return None

    def state(self, now: datetime) -> KeyState:
        """For lists: active, grace (rotated, still working), revoked or expired."""
        refusal = self.refusal(now)
        if refusal is not None:
            return "revoked" if self.revoked_at is not None and self.revoked_at <= now else "expired"
        return "grace" if self.revoked_at is not None else "active"


def new_key() -> IssuedKey:
    return IssuedKey(key_id=secrets.token_hex(6), secret=secrets.token_urlsafe(_SECRET_BYTES))


def key_id_of(presented: str) -> str | None:
    """The key id of a key in the platform's format, None for anything else (e.g. a bootstrap key)."""
    match = _KEY.fullmatch(presented)
    return match[1] if match else None


def hash_key(pepper: bytes, presented: str) -> bytes:
    """HMAC-SHA256 of the whole key under the pepper: what the store keeps, and the cache's key."""
    return hmac.new(pepper, presented.encode(), hashlib.sha256).digest()


def same_hash(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def pepper_of(settings: Settings) -> bytes:
    """The pepper to hash keys with; in production a real one is required (the error says how to set it)."""
    pepper = settings.key_pepper.get_secret_value()
    if settings.environment != "production":
        return (pepper or DEVELOPMENT_PEPPER).encode()
    fix = (
        "set MLP_KEY_PEPPER to a random value of at least 32 characters (e.g. `openssl rand -hex 32`), "
        "from the Secret mlp-api-auth in Kubernetes; keep it: changing it invalidates every stored key"
    )
    if not pepper:
        raise AuthNotConfigured(f"MLP_ENVIRONMENT=production needs an API key pepper: {fix}")
    if pepper == DEVELOPMENT_PEPPER or any(p in pepper.lower() for p in _PLACEHOLDERS):
        raise AuthNotConfigured(f"MLP_KEY_PEPPER holds a placeholder or the development pepper: {fix}")
    if len(pepper) < MIN_PEPPER_CHARS:
        raise AuthNotConfigured(f"MLP_KEY_PEPPER is {len(pepper)} characters long: {fix}")
    return pepper.encode()


def check_user_id(user_id: str) -> str:
    if not IDENTIFIER.fullmatch(user_id):
        raise InvalidKeyInput(f"user id must match {IDENTIFIER.pattern}, got {user_id!r}")
    return user_id


def check_key_id(key_id: str) -> str:
    if not KEY_ID.fullmatch(key_id):
        raise InvalidKeyInput(f"a key id is 12 hex characters (the part after mlp_), got {key_id!r}")
    return key_id


def check_scope(scope: str) -> KeyScope:
    for known in SCOPES:
        if scope == known:
            return known
    raise InvalidKeyInput(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")


def key_id_or_key(text: str) -> str:
    """What ``mlp keys revoke`` accepts: a key id, or a whole key (its id is used)."""
    key_id = key_id_of(text)
    if key_id is not None:
        return key_id
    if KEY_ID.fullmatch(text):
        return text
    raise InvalidKeyInput(
        "give a key id (12 hex characters, as `mlp keys list` shows) or a whole key mlp_<id>_<secret>; "
        "a key from MLP_API_KEYS is removed from that setting instead"
    )


_DURATION: Final = re.compile(r"^(\d{1,6})([smhdw])$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, *, maximum: timedelta, allow_zero: bool = False) -> timedelta:
    """``90d``, ``24h``, ``30m``, ``45s``, ``2w`` as a timedelta within (0 or 1 s)..maximum."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InvalidKeyInput(f"a duration is a number and a unit s, m, h, d or w (e.g. 90d, 24h), got {text!r}")
    duration = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    if duration > maximum:
        raise InvalidKeyInput(f"{text!r} is longer than the maximum of {maximum.days} days")
    if duration == timedelta(0) and not allow_zero:
        raise InvalidKeyInput(f"{text!r} is no time at all")
    return duration


@dataclass(frozen=True, slots=True)
class BootstrapKey:
    """One entry of ``MLP_API_KEYS``: a key chosen by the operator, kept in the environment (a Secret)."""

    key: str
    user_id: str
    scope: KeyScope


def parse_bootstrap_keys(raw: str) -> list[BootstrapKey]:
    """``MLP_API_KEYS=key1=user1,key2=user2/admin``: ``/admin`` gives the key the admin scope (``/`` is
    not in the user id alphabet, so it cannot be part of a user id)."""
    found: list[BootstrapKey] = []
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, owner = item.partition("=")
        user_id, slash, scope = owner.partition("/")
        if not sep or not key.strip() or not user_id:
            raise InvalidKeyInput("MLP_API_KEYS must look like key1=user1,key2=user2 (or key=user/admin)")
        found.append(BootstrapKey(key.strip(), check_user_id(user_id.strip()), check_scope(scope if slash else "user")))
    if len({b.key for b in found}) != len(found):
        raise InvalidKeyInput("MLP_API_KEYS names the same key twice")
    return found


def runs_open(settings: Settings, bootstrap_keys: int, stored_keys: int) -> bool:
    """Open mode: development or test without any key configured (the authenticator's rule, counted)."""
    return settings.environment != "production" and not bootstrap_keys and not stored_keys


def auth_mode(settings: Settings, bootstrap_keys: int, stored_keys: int) -> str:
    """One line saying how the services authenticate (``mlp up`` prints it)."""
    if not runs_open(settings, bootstrap_keys, stored_keys):
        return f"keys required ({stored_keys} stored, {bootstrap_keys} from MLP_API_KEYS; docs/auth.md)"
    return (
        f"open ({settings.environment}: no API key configured, every caller sees everything; "
        "`mlp keys create USER` ends it)"
    )
