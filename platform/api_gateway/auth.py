"""Who is calling: an API key names the user; the body's user_id is trusted only when no keys are configured.

Keys come from ``MLP_API_KEYS`` (a Secret in Kubernetes): ``key1=user1,key2=user2``. With keys
configured, a request without a valid key is refused, and a body ``user_id`` that differs from the
key's user is refused (never let one user spend another's quota).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


class AuthError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_api_keys(raw: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, user = item.partition("=")
        if not sep or not key or not user:
            raise ValueError("MLP_API_KEYS must look like key1=user1,key2=user2")
        keys[key] = user
    return keys


def resolve_user(api_keys: Mapping[str, str], presented_key: str | None, body_user_id: str) -> str:
    """The user the request is for. Pure, so the rule is testable without HTTP."""
    if not api_keys:
        return body_user_id
    if not presented_key:
        raise AuthError(401, "an API key is required (Authorization: Bearer <key> or X-API-Key)")
    for key, user in api_keys.items():
        if hmac.compare_digest(key.encode(), presented_key.encode()):
            if body_user_id != user:
                raise AuthError(403, "user_id in the body does not match the API key's user")
            return user
    raise AuthError(401, "unknown API key")
