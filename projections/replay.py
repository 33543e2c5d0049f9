"""``mlp replay``: rebuild the read models (and the Redis status cache) from the event store.

1. Fresh tables ``<table>_rebuild`` are created like the live ones (columns, defaults, checks and
   every index, under temporary names).
2. ``event_store`` is read in position order, in chunks, and each chunk is projected into the fresh
   tables with the same projector and SQL as the live collector (``plan_events`` + ``apply_plan``).
3. One transaction swaps them in: it locks ``event_store`` against writers (readers go on), projects
   the events committed since the scan (positions above the scan's end, or in the gaps it saw: a
   bigserial position is taken at insert but becomes visible at commit, so a gap may fill later),
   then renames the tables and restores the index and constraint names, the owner and the grants
   (the services' roles, migration 0005). Readers see the old models or the new ones, never a
   half-built one; collectors wait on the lock, then carry on.
4. The status cache is re-populated from the rebuilt tables (requests updated within its TTL).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import asyncpg

from events.model import AnyEvent, EventDecodeError, decode_event
from mlp.cache import create_redis
from mlp.settings import Settings
from projections.postgres import LIVE, Connection, Tables, apply_plan
from projections.projector import plan_events
from projections.queries import cache_fields_of_row, select_view_sql
from projections.status_cache import StatusCache, StatusKeys

log = logging.getLogger(__name__)

REBUILD_SUFFIX = "_rebuild"
_INDEX_SUFFIX = "_rb"
_LOCK_KEY = 0x6D6C7072  # "mlpr": one replay at a time
CACHE_TTL_S = 86_400


class ReplayError(RuntimeError):
    pass


@dataclass(frozen=True)
class ReplayReport:
    events: int
    skipped: int
    requests: int
    results: int
    usage: int
    cached: int
    seconds: float


class Progress:
    """A plain-text progress line on stderr (rewritten in place, at most five times a second)."""

    def __init__(self, label: str, total: int, out: TextIO | None = None) -> None:
        self._label, self._total = label, max(total, 0)
        self._out = out if out is not None else sys.stderr  # looked up now: tests and callers swap stderr
        self._done = 0
        self._started = time.monotonic()
        self._shown = 0.0

    def advance(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._shown >= 0.2:
            self._shown = now
            self._write("\r")

    def finish(self) -> None:
        self._write("\r")
        self._out.write("\n")
        self._out.flush()

    def _write(self, prefix: str) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        pct = f" ({100 * self._done / self._total:5.1f}%)" if self._total else ""
        rate = self._done / elapsed
        self._out.write(f"{prefix}{self._label}: {self._done}/{self._total}{pct} {rate:,.0f}/s")
        self._out.flush()


@dataclass(frozen=True)
class _Index:
    name: str
    definition: str  # pg_get_indexdef of the live index
    constraint: str | None  # "PRIMARY KEY" / "UNIQUE" when the index backs a constraint


async def _indexes(conn: Connection, table: str) -> list[_Index]:
    rows = await conn.fetch(
        """
        SELECT i.relname AS name, pg_get_indexdef(i.oid) AS definition, c.contype::text AS contype
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.contype IN ('p', 'u')
        WHERE x.indrelid = $1::text::regclass
        ORDER BY i.relname
        """,
        table,
    )
    kinds = {"p": "PRIMARY KEY", "u": "UNIQUE"}
    return [_Index(r["name"], r["definition"], kinds.get(r["contype"] or "")) for r in rows]


def _rebuild_index_sql(index: _Index, table: str) -> str:
    """The live index's definition, retargeted at the rebuild table under a temporary name."""
    head, sep, tail = index.definition.partition(" ON ")
    if not sep or not head.endswith(f" {index.name}"):
        raise ReplayError(f"unexpected index definition: {index.definition}")
    on_table, _, rest = tail.partition(" USING ")
    if on_table.split(".")[-1] != table:
        raise ReplayError(f"index {index.name} is not on {table}: {index.definition}")
    head = head[: -len(index.name)] + index.name + _INDEX_SUFFIX
    return f"{head} ON {table}{REBUILD_SUFFIX} USING {rest}"


async def _create_rebuild_tables(conn: Connection, live: Tables) -> dict[str, list[_Index]]:
    indexes: dict[str, list[_Index]] = {}
    for table in live.all():
        await conn.execute(f"DROP TABLE IF EXISTS {table}{REBUILD_SUFFIX}")
        await conn.execute(
            f"CREATE TABLE {table}{REBUILD_SUFFIX} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
            " INCLUDING GENERATED INCLUDING IDENTITY INCLUDING STORAGE INCLUDING COMMENTS)"
        )
        indexes[table] = await _indexes(conn, table)
        for index in indexes[table]:
            await conn.execute(_rebuild_index_sql(index, table))
    return indexes


def _decode(payloads: Sequence[str]) -> tuple[list[AnyEvent], int]:
    events: list[AnyEvent] = []
    skipped = 0
    for payload in payloads:
        try:
            events.append(decode_event(payload))
        except EventDecodeError as exc:  # e.g. a type newer than this reader: keep going, report it
            skipped += 1
            log.warning("replay: skipping an event this version cannot decode: %s", exc)
    return events, skipped


async def _project_rows(conn: Connection, rows: Sequence[asyncpg.Record], target: Tables) -> int:
    events, skipped = _decode([r["payload"] for r in rows])
    async with conn.transaction():
        await apply_plan(conn, plan_events(events), target)
    return skipped


# The old table's owner, and its grants as statements for the new one (the owner's own rights aside).
_OWNER = "SELECT relowner::regrole::text FROM pg_class WHERE oid = $1::regclass"
_GRANTS = """
SELECT format('GRANT %s ON %I TO %s%s', a.privilege_type, $2::text,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
              CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
LEFT JOIN pg_roles AS r ON r.oid = a.grantee
WHERE c.oid = $1::regclass AND a.grantee <> c.relowner
ORDER BY 1
"""


async def _take_owner_and_grants(conn: Connection, old: str, new: str) -> None:
    """The new table gets the old one's owner (the migrations' role, whoever runs the replay) and grants:
    without them the services' roles would lose their access to the read models at the swap."""
    owner = await conn.fetchval(_OWNER, old)
    if owner != await conn.fetchval(_OWNER, new):
        await conn.execute(f"ALTER TABLE {new} OWNER TO {owner}")
    for grant in await conn.fetch(_GRANTS, old, new):
        await conn.execute(grant[0])


async def _swap(conn: Connection, live: Tables, indexes: dict[str, list[_Index]]) -> None:
    """Inside the swap transaction: rebuild tables become the live ones, with the live names."""
    for table in live.all():
        await conn.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
        await conn.execute(f"ALTER TABLE {table}{REBUILD_SUFFIX} RENAME TO {table}")
        await _take_owner_and_grants(conn, f"{table}_old", table)
        await conn.execute(f"DROP TABLE {table}_old")
        for index in indexes[table]:
            temporary = index.name + _INDEX_SUFFIX
            if index.constraint is not None:
                await conn.execute(
                    f"ALTER TABLE {table} ADD CONSTRAINT {index.name} {index.constraint} USING INDEX {temporary}"
                )
            else:
                await conn.execute(f"ALTER INDEX {temporary} RENAME TO {index.name}")


_SCAN = """
SELECT position, payload::text AS payload FROM event_store
WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3
"""
_CATCH_UP = """
SELECT position, payload::text AS payload FROM event_store e
WHERE e.position > $1
   OR EXISTS (SELECT 1 FROM unnest($2::bigint[], $3::bigint[]) AS g(lo, hi) WHERE e.position BETWEEN g.lo AND g.hi)
ORDER BY position
"""


async def rebuild(conn: Connection, *, chunk: int = 2000, out: TextIO | None = None) -> tuple[int, int]:
    """Rebuild the read models from event_store and swap them in. Returns (events projected, skipped)."""
    live = LIVE
    target = live.suffixed(REBUILD_SUFFIX)
    indexes = await _create_rebuild_tables(conn, live)
    high = await conn.fetchval("SELECT coalesce(max(position), 0) FROM event_store")
    total = await conn.fetchval("SELECT count(*) FROM event_store WHERE position <= $1", high)
    progress = Progress("replay events", total, out)
    gaps: list[tuple[int, int]] = []  # position ranges not seen by the scan (may commit later)
    last = 0
    done = skipped = 0
    while True:
        rows = await conn.fetch(_SCAN, last, high, chunk)
        if not rows:
            break
        for row in rows:
            if row["position"] > last + 1:
                gaps.append((last + 1, row["position"] - 1))
            last = row["position"]
        skipped += await _project_rows(conn, rows, target)
        done += len(rows)
        progress.advance(len(rows))
    if last < high:
        gaps.append((last + 1, high))
    async with conn.transaction():
        # Writers wait from here to the commit; readers go on reading the old models.
        await conn.execute("LOCK TABLE event_store IN EXCLUSIVE MODE")
        late = await conn.fetch(_CATCH_UP, high, [lo for lo, _ in gaps], [hi for _, hi in gaps])
        if late:
            skipped += await _project_rows(conn, late, target)
            done += len(late)
            progress.advance(len(late))
        await _swap(conn, live, indexes)
    progress.finish()
    return done, skipped


async def repopulate_cache(
    conn: Connection, cache: StatusCache, *, ttl_s: int = CACHE_TTL_S, chunk: int = 1000, out: TextIO | None = None
) -> int:
    """Write the rebuilt state of every request updated within the cache TTL into the status cache."""
    where = "WHERE r.updated_at > now() - make_interval(secs => $1)"
    total = await conn.fetchval(f"SELECT count(*) FROM {LIVE.requests} r {where}", float(ttl_s))
    progress = Progress("replay status cache", total, out)
    written = 0
    async with conn.transaction():
        cursor = conn.cursor(select_view_sql() + where + " ORDER BY r.request_id", float(ttl_s), prefetch=chunk)
        batch: list[tuple[str, dict[str, str]]] = []
        async for row in cursor:
            batch.append((row["request_id"], cache_fields_of_row(row)))
            if len(batch) >= chunk:
                written += await cache.restore_many(batch)
                progress.advance(len(batch))
                batch = []
        written += await cache.restore_many(batch)
        progress.advance(len(batch))
    progress.finish()
    return written


async def replay(
    settings: Settings, *, chunk: int = 2000, with_cache: bool = True, out: TextIO | None = None
) -> ReplayReport:
    started = time.monotonic()
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            raise ReplayError("another replay is running")
        try:
            events, skipped = await rebuild(conn, chunk=chunk, out=out)
            cached = 0
            if with_cache:
                redis_client = create_redis(settings)
                try:
                    cache = StatusCache(redis_client, StatusKeys(settings.redis_prefix), ttl_s=CACHE_TTL_S)
                    cached = await repopulate_cache(conn, cache, out=out)
                finally:
                    await redis_client.aclose()
            counts = [await conn.fetchval(f"SELECT count(*) FROM {t}") for t in (LIVE.requests, LIVE.results)]
            usage = await conn.fetchval(f"SELECT count(*) FROM {LIVE.usage}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    return ReplayReport(events, skipped, counts[0], counts[1], usage, cached, time.monotonic() - started)
