"""``mlp quota``: show or set a user's quota plan and limits, list the plans.

  mlp quota plans
  mlp quota show <user>
  mlp quota set <user> [--plan P] [--tokens-per-day N] [--tokens-per-month N]
                       [--requests-per-minute N] [--max-tokens-per-request N] [--clear-overrides]

Exit codes: 0 done, 1 not found / service unavailable, 2 bad input (message on stderr).
Running services pick up a change at once: it notifies their limits cache (quota.limits_follower; within
a few seconds where a service cannot listen).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import asyncpg

from mlp.settings import Settings, get_settings
from quota import store
from quota.plans import (
    LIMIT_NAMES,
    MAX_LIMIT,
    InvalidQuota,
    Limits,
    Overrides,
    UnknownPlan,
    check_plan_name,
    check_user_id,
    effective_limits,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input: exit code 2."""


class UnknownUser(LookupError):
    """``show`` of a user without a quota row: exit code 1."""


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    if value > MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_LIMIT}, got {value}")
    return value


def _user(text: str) -> str:
    try:
        return check_user_id(text)
    except InvalidQuota as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plan(text: str) -> str:
    try:
        return check_plan_name(text)
    except InvalidQuota as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlp quota", description="Show or set quota plans and per-user limits.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plans,show,set}")
    commands.add_parser("plans", help="list the quota plans")
    show = commands.add_parser("show", help="show a user's plan, overrides and effective limits")
    show.add_argument("user", type=_user)
    set_ = commands.add_parser("set", help="set a user's plan and/or per-limit overrides")
    set_.add_argument("user", type=_user)
    set_.add_argument("--plan", type=_plan, help="the plan's name (see `mlp quota plans`)")
    for name in LIMIT_NAMES:
        set_.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_non_negative, metavar="N")
    set_.add_argument("--clear-overrides", action="store_true", help="drop the user's overrides first")
    return parser


def _format_limits(limits: Limits) -> list[str]:
    return [f"  {name.replace('_', ' ')}: {getattr(limits, name):,}" for name in LIMIT_NAMES]


async def _plans(conn: asyncpg.Connection) -> list[str]:
    lines = []
    for plan in await store.list_plans(conn):
        values = "  ".join(f"{name}={getattr(plan, name)}" for name in LIMIT_NAMES)
        lines.append(f"{plan.plan:<12} {values}")
    return lines


async def _show(conn: asyncpg.Connection, user_id: str, settings: Settings) -> list[str]:
    quota = await store.get_user_quota(conn, user_id)
    if quota is None:
        raise UnknownUser(
            f"user {user_id!r} has no quota settings; the default plan {settings.default_plan!r} applies "
            f"(set one with `mlp quota set {user_id} --plan <plan>`)"
        )
    plans = {p.plan: p for p in await store.list_plans(conn)}
    limits = effective_limits(plans[quota.plan], quota.overrides)
    overrides = {n: v for n, v in quota.overrides.as_dict().items() if v is not None}
    lines = [f"user: {user_id}", f"plan: {quota.plan}", f"updated_at: {quota.updated_at.isoformat()}"]
    lines.append("overrides: " + (", ".join(f"{n}={v}" for n, v in overrides.items()) or "none"))
    lines.append("effective limits:")
    return lines + _format_limits(limits)


async def _set(conn: asyncpg.Connection, args: argparse.Namespace, settings: Settings) -> list[str]:
    overrides = Overrides(**{name: getattr(args, name) for name in LIMIT_NAMES})
    if args.plan is None and overrides.is_empty() and not args.clear_overrides:
        raise UsageError("nothing to set: give --plan and/or a limit option (see `mlp quota set --help`)")
    stored = await store.set_user_quota(
        conn,
        args.user,
        plan=args.plan,
        overrides=overrides,
        clear_overrides=args.clear_overrides,
        default_plan=settings.default_plan,
    )
    return [f"updated {stored.user_id}", *await _show(conn, stored.user_id, settings)]


async def _run(args: argparse.Namespace, settings: Settings) -> list[str]:
    conn = await asyncpg.connect(settings.postgres_dsn, timeout=10)
    try:
        if args.command == "plans":
            return await _plans(conn)
        if args.command == "show":
            return await _show(conn, args.user, settings)
        return await _set(conn, args, settings)
    finally:
        await conn.close()


def main(argv: Sequence[str], settings: Settings | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed the message (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    settings = settings or get_settings()
    try:
        lines = asyncio.run(_run(args, settings))
    except (UsageError, UnknownPlan, InvalidQuota) as exc:
        print(f"mlp quota: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnknownUser as exc:
        print(f"mlp quota: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        where = settings.redacted(settings.postgres_dsn)
        print(f"mlp quota: database {where} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(lines))
    return EXIT_OK
