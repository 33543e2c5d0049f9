"""PostgreSQL adapter: pool factory and database creation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolAcquireContext

from mlp.settings import Settings
from mlp.telemetry import asyncpg_init_for

log = logging.getLogger(__name__)


class BoundedPool(asyncpg.Pool):
    """A pool whose every acquire waits at most ``acquire_timeout_s`` (asyncpg's own waits forever).

    ``pool.fetch``/``fetchval``/``execute`` acquire through ``acquire`` too, so one slow caller (or a
    flood of them) gets a ``TimeoutError`` instead of queueing everyone behind it without bound.
    """

    def __init__(self, *args: Any, acquire_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout_s = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """The reset a released connection gets: none beyond asyncpg's own (an open transaction rolled back).

    asyncpg's default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: one more round trip per query made through the pool (2.6% of the worker's CPU). No service
    leaves session state on a pooled connection: locks are transaction-scoped (``pg_advisory_xact_lock``),
    LISTEN has a connection of its own (``listen_forever``), and nothing runs ``SET`` or keeps a cursor.
    """


async def create_pool(
    settings: Settings,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout_s: float | None = None,
    acquire_timeout_s: float | None = None,
) -> asyncpg.Pool:
    """The services' pool: connect, acquire and command timeouts from the settings unless given.

    A statement running past the command timeout is cancelled and raises ``TimeoutError``, as does an
    acquire that finds no free connection in time: the HTTP services answer both with 503.
    """
    pool = BoundedPool(
        settings.postgres_dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        # Query spans on every connection when tracing is on (init is None, and costs nothing, when off).
        init=asyncpg_init_for(),
        reset=_keep_session,
        timeout=10,  # connect
        command_timeout=command_timeout_s or settings.postgres_command_timeout_s,
        acquire_timeout_s=acquire_timeout_s or settings.postgres_acquire_timeout_s,
    )
    await pool
    return pool


def admin_dsn(dsn: str, database: str = "postgres") -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def ensure_database(dsn: str) -> bool:
    """Create the DSN's database when it is missing. Returns True when it was created."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn(dsn), timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        quoted = '"' + name.replace('"', '""') + '"'
        try:
            await conn.execute(f"CREATE DATABASE {quoted}")
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


async def drop_database(dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn(dsn), timeout=10)
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        await conn.close()


Connect = Callable[[], Awaitable[asyncpg.Connection]]


def listen_connector(dsn: str) -> Connect:
    """The ``connect`` of ``listen_forever``: a session of its own on ``dsn`` (a LISTEN cannot use the pool)."""

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn, timeout=10)

    return connect


# A LISTEN connection is checked with a query this often: a half-open TCP connection is noticed this late.
LISTEN_PING_S = 10.0
LISTEN_RECONNECT_S = 1.0


async def listen_forever(
    connect: Connect,
    channel: str,
    on_notify: Callable[[Any, int, str, object], None],  # (connection, pid, channel, payload)
    *,
    listening: asyncio.Event,
    on_listening: Callable[[], None],
    closing: Callable[[], bool],
    what: str,
) -> None:
    """LISTEN on ``channel`` until ``closing()``, reconnecting when the connection is lost (Postgres restarting).

    ``listening`` is set while the LISTEN is in place; ``on_listening`` runs each time it is (again): whatever
    was notified while nothing listened is the caller's to catch up on. ``what`` names the feed in logs."""
    while not closing():
        conn: asyncpg.Connection | None = None
        try:
            conn = await connect()
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            await conn.add_listener(channel, on_notify)
            listening.set()
            on_listening()
            while not closing():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), LISTEN_PING_S)
                if lost.is_set() or conn.is_closed():
                    raise ConnectionError("the listening connection closed")
                await conn.execute("SELECT 1", timeout=5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if closing():
                return
            log.warning("%s lost (%r); listening again", what, exc)
            await asyncio.sleep(LISTEN_RECONNECT_S)
        finally:
            listening.clear()
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
