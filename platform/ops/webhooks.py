"""``mlp webhooks list|replay``: inspect the webhook delivery log and re-drive deliveries (docs/operations.md).

  mlp webhooks list [--state pending|delivered|failed] [--webhook WH_ID] [--user USER] [--limit N] [--json]
  mlp webhooks replay [DELIVERY_ID ...] [--webhook WH_ID]

``replay`` without ids re-queues every failed delivery (of one webhook with ``--webhook``); with ids, those
deliveries whatever their state (a delivered one is sent again, with the same webhook-id). They are due at
once, with a fresh retry window; a running dispatcher picks them up within its poll interval.
Exit codes: 0 done, 1 database unavailable or nothing to replay, 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Sequence

import asyncpg

from mlp.settings import Settings, get_settings
from webhooks import store
from webhooks.rules import DELIVERY_STATES, DeliveryState

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _webhook_id(text: str) -> str:
    if not re.fullmatch(store.WEBHOOK_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"not a webhook id (wh_ + 24 hex characters): {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlp webhooks", description="Inspect and re-drive webhook deliveries.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="the delivery log, newest first")
    listing.add_argument("--state", choices=DELIVERY_STATES)
    listing.add_argument("--webhook", type=_webhook_id)
    listing.add_argument("--user")
    listing.add_argument("--limit", type=int, default=100, choices=range(1, 10_001), metavar="N")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = verbs.add_parser("replay", help="re-queue failed (or the given) deliveries")
    replay.add_argument("ids", nargs="*", type=int, metavar="DELIVERY_ID")
    replay.add_argument("--webhook", type=_webhook_id)
    return parser


def format_delivery(d: store.Delivery) -> str:
    target = d.webhook_id or "one-off"
    status = "-" if d.last_status_code is None else str(d.last_status_code)
    next_at = d.next_attempt_at.isoformat(timespec="seconds") if d.next_attempt_at else "-"
    error = f"  {d.last_error}" if d.last_error else ""
    return (
        f"{d.delivery_id:>8}  {d.state:<9} {target:<27} {d.event_type:<20} {d.event_id}  attempts={d.attempts}"
        f" status={status} next={next_at}{error}"
    )


def _as_json(d: store.Delivery) -> str:
    return json.dumps(
        {
            "delivery_id": d.delivery_id,
            "webhook_id": d.webhook_id,
            "user_id": d.user_id,
            "event_id": d.event_id,
            "event_type": d.event_type,
            "request_id": d.request_id,
            "state": d.state,
            "attempts": d.attempts,
            "last_status_code": d.last_status_code,
            "last_error": d.last_error,
            "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
            "created_at": d.created_at.isoformat(),
            "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
        }
    )


async def _run(args: argparse.Namespace, settings: Settings) -> tuple[int, list[str]]:
    pool = await asyncpg.create_pool(settings.postgres_dsn, min_size=1, max_size=1, timeout=10)
    assert pool is not None
    try:
        if args.verb == "list":
            state: DeliveryState | None = args.state
            found = await store.list_deliveries(
                pool, state=state, webhook_id=args.webhook, user_id=args.user, limit=args.limit
            )
            return EXIT_OK, [(_as_json if args.json else format_delivery)(d) for d in found]
        replayed = await store.replay(pool, delivery_ids=args.ids, webhook_id=args.webhook)
        if not replayed:
            return EXIT_FAILED, ["nothing to replay"]
        return EXIT_OK, [f"re-queued {len(replayed)} deliveries: {', '.join(map(str, replayed))}"]
    finally:
        await pool.close()


def main(argv: Sequence[str], settings: Settings | None = None) -> int:
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    settings = settings or get_settings()
    try:
        code, lines = asyncio.run(_run(args, settings))
    except asyncpg.UndefinedTableError:
        print("mlp webhooks: the webhook tables are missing: run `mlp migrate` first", file=sys.stderr)
        return EXIT_FAILED
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        where = settings.redacted(settings.postgres_dsn)
        print(f"mlp webhooks: database {where} unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if lines:
        print("\n".join(lines), file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code
