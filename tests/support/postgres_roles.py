"""LOGIN users of a test run in the services' Postgres roles (migration 0005), as each Deployment's user is.

The group roles are cluster-wide and stay; the LOGIN users are dropped afterwards, also on failure.
Local connections are trusted here, so a user needs no password.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

SERVICE_ROLES = ("mlp_gateway", "mlp_worker", "mlp_collector", "mlp_read_api", "mlp_dispatcher")


def dsn_as(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port or 5432}"))


@asynccontextmanager
async def login_users(admin_dsn: str, roles: Iterable[str] = SERVICE_ROLES) -> AsyncIterator[dict[str, str]]:
    """Per role, the DSN of a fresh LOGIN member of it (same database as ``admin_dsn``)."""
    suffix = uuid.uuid4().hex[:8]
    users = {role: f"{role}_t{suffix}" for role in roles}
    admin = await asyncpg.connect(admin_dsn)
    try:
        for role, user in users.items():
            await admin.execute(f"CREATE ROLE {user} LOGIN IN ROLE {role}")
        yield {role: dsn_as(admin_dsn, user) for role, user in users.items()}
    finally:
        for user in users.values():
            await admin.execute(f"DROP ROLE IF EXISTS {user}")
        await admin.close()
