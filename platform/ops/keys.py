"""``mlp keys``: create, list, revoke and rotate API keys (stored hashed in Postgres; docs/auth.md).

  mlp keys create USER [--admin] [--expires 90d]   the new key is printed once, on the last line
  mlp keys list [USER]                             ids, owners, states; never a key or its hash
  mlp keys revoke KEY_ID_OR_KEY                    stops working within MLP_AUTH_CACHE_TTL_S everywhere
  mlp keys rotate KEY_ID [--grace 24h]             a new key; the old one works for the grace period

Needs the services' MLP_POSTGRES_DSN and MLP_KEY_PEPPER (the pepper the services hash keys with).
Exit codes: 0 done, 1 not found / not possible / database unavailable, 2 bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg

from events.model import utc_now
from mlp.settings import Settings, get_settings
from tenancy.key_store import KeyNotRotatable, KeyStore, UnknownKey
from tenancy.keys import (
    DEFAULT_GRACE,
    MAX_GRACE,
    MAX_LIFETIME,
    AuthNotConfigured,
    InvalidKeyInput,
    KeyRecord,
    KeyScope,
    check_key_id,
    check_user_id,
    key_id_or_key,
    parse_duration,
    pepper_of,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _typed(check: Callable[[str], object]) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return check(text)
        except InvalidKeyInput as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlp keys", description="Create, list, revoke and rotate API keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{create,list,revoke,rotate}")
    create = commands.add_parser("create", help="create a key for a user; prints it once, on the last line")
    create.add_argument("user", type=_typed(check_user_id))
    create.add_argument("--admin", action="store_true", help="admin scope: reads every user's data, manages keys")
    create.add_argument(
        "--expires",
        type=_typed(lambda t: parse_duration(t, maximum=MAX_LIFETIME)),
        metavar="DURATION",
        help="lifetime, e.g. 90d, 12h, 2w (default: no expiry)",
    )
    list_ = commands.add_parser("list", help="list keys (all, or one user's)")
    list_.add_argument("user", nargs="?", type=_typed(check_user_id))
    revoke = commands.add_parser("revoke", help="revoke a key now (by key id, or the key itself)")
    revoke.add_argument("key", type=_typed(key_id_or_key), metavar="KEY_ID_OR_KEY")
    rotate = commands.add_parser("rotate", help="make a new key; the old one keeps working for --grace")
    rotate.add_argument("key", type=_typed(check_key_id), metavar="KEY_ID")
    rotate.add_argument(
        "--grace",
        type=_typed(lambda t: parse_duration(t, maximum=MAX_GRACE, allow_zero=True)),
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="how long the old key keeps working (default 24h; 0s: stops at once)",
    )
    return parser


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.isoformat(timespec="seconds")


def _row(record: KeyRecord, now: datetime) -> str:
    until = record.ends_at()
    note = f"  replaced by {record.replaced_by}" if record.replaced_by else ""
    return (
        f"{record.key_id}  {record.user_id:<20} {record.scope:<5}  {record.state(now):<7}  "
        f"created {_when(record.created_at)}  until {_when(until)}  last used {_when(record.last_used_at)}{note}"
    )


async def _run(args: argparse.Namespace, settings: Settings, now: datetime) -> list[str]:
    pepper = pepper_of(settings)  # before connecting: production without a pepper stops here
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=1, timeout=10)
    assert pool is not None
    store = KeyStore(pool, pepper)
    try:
        if args.command == "create":
            scope: KeyScope = "admin" if args.admin else "user"
            expires_at = None if args.expires is None else now + args.expires
            created = await store.create(args.user, scope, now, expires_at)
            return [
                f"created {scope} key {created.record.key_id} for {args.user}, expires {_when(expires_at)}",
                "store it now: it is shown only once (as `Authorization: Bearer <key>`):",
                created.plaintext,
            ]
        if args.command == "list":
            records = await store.list(args.user)
            return [_row(r, now) for r in records] or ["no API keys" + (f" for {args.user}" if args.user else "")]
        if args.command == "revoke":
            record, changed = await store.revoke(args.key, now)
            if not changed:
                return [f"key {record.key_id} ({record.user_id}) was already revoked at {_when(record.revoked_at)}"]
            return [f"revoked key {record.key_id} ({record.user_id}); services refuse it within their cache TTL"]
        rotated = await store.rotate(args.key, now, args.grace)
        new = rotated.created
        return [
            f"rotated key {rotated.old.key_id} ({rotated.old.user_id}): it works until {_when(rotated.old.revoked_at)}",
            f"new {new.record.scope} key {new.record.key_id}, expires {_when(new.record.expires_at)}",
            "store it now: it is shown only once:",
            new.plaintext,
        ]
    finally:
        await pool.close()


def main(argv: Sequence[str], settings: Settings | None = None, clock: Callable[[], datetime] = utc_now) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed the message (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    settings = settings or get_settings()
    try:
        lines = asyncio.run(_run(args, settings, clock()))
    except AuthNotConfigured as exc:
        print(f"mlp keys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownKey as exc:
        print(f"mlp keys: no API key {exc.args[0]} (see `mlp keys list`)", file=sys.stderr)
        return EXIT_FAILED
    except KeyNotRotatable as exc:
        print(f"mlp keys: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except asyncpg.UndefinedTableError:
        print("mlp keys: the api_keys table is missing: run `mlp migrate` first", file=sys.stderr)
        return EXIT_FAILED
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        where = settings.redacted(settings.postgres_dsn)
        print(f"mlp keys: database {where} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK
