"""The authenticated caller and the pure rules of what it may see: one place, used by both APIs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["user", "admin", "open"]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling. ``open``: development with no key configured anywhere (everyone sees everything)."""

    user_id: str | None  # None in open mode; a key always belongs to a user (an admin key too)
    scope: Scope
    key_id: str | None = None  # the key's public id, for logs; None in open mode

    @property
    def is_admin(self) -> bool:
        return self.scope in ("admin", "open")

    def may_see_user(self, user_id: str) -> bool:
        """A user's quota, usage and requests: its own, or everyone's for an admin."""
        return self.is_admin or self.user_id == user_id

    def submits_as(self, body_user_id: str) -> str | None:
        """The user a submit is charged to, or None when the body names another user than the key's.
        An admin key (and open mode) may submit for any user: the body names whom to charge."""
        if self.is_admin:
            return body_user_id
        return self.user_id if body_user_id == self.user_id else None


OPEN = Caller(user_id=None, scope="open")
