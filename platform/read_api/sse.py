"""Server-sent events of a request's stream, pure: the wire format, and what a stream still has to send.

One SSE message per stored domain event: ``id:`` its event_id, ``event:`` its type (the union's tag),
``data:`` its JSON as the event store holds it. A stream ends after the terminal event.

Resuming (``Last-Event-ID``) is decided by the event store's order, never by comparing ids: event ids are
UUIDv7 from several machines' clocks, so their order is not the stream's. A stream sends each event it
has not sent yet in stream order (``occurred_at, event_id``) on every re-read, so an event stored late
(with an earlier ``occurred_at``) still goes out. What a resumed client already holds is what sorts at or
before its last event in stream order AND was stored before it (``position``) or with it (in the same
transaction: visible together): an event that sorts before it but was stored after it was never sent to
that client. At least once: an event stored before the last
one but sorting after it may be sent again; clients dedupe by ``id``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Final

from events.model import TERMINAL_EVENTS
from projections.event_log import EventHead

# The outcome types: a stream ends after one (the union's tags; the status rules say which are terminal).
TERMINAL_TYPES: Final[frozenset[str]] = frozenset(event.__name__ for event in TERMINAL_EVENTS)

# SSE's line terminators (and only these: str.splitlines also splits on U+2028 and others, which JSON
# carries raw, and the client would turn each into a newline).
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")

HEARTBEAT: Final = b": ping\n\n"


def _field(value: str) -> str:
    return _LINE_BREAK.sub(" ", value)


def format_sse(event_id: str, event_type: str, data: str) -> bytes:
    """One SSE message; every line of ``data`` becomes a ``data:`` line (the client joins them with newlines)."""
    lines = [f"id: {_field(event_id)}", f"event: {_field(event_type)}"]
    lines += [f"data: {line}" for line in _LINE_BREAK.split(data)]
    return ("\n".join(lines) + "\n\n").encode()


def parse_event_id(value: str | None) -> str | None:
    """A Last-Event-ID as the store writes event ids (canonical UUID text); ValueError when it is not a UUID."""
    if value is None or not value.strip():
        return None
    if len(value) > 64:
        raise ValueError("too long for an event id")
    return str(uuid.UUID(value.strip()))


def sent_through(heads: Sequence[EventHead], last_event_id: str | None) -> set[str]:
    """The event ids a client resuming after ``last_event_id`` already holds (``heads`` in stream order).

    An id the stream does not hold (another request's, or one from before a replay) holds nothing: the
    stream is sent from its start.
    """
    if last_event_id is None:
        return set()
    marker = next((i for i, head in enumerate(heads) if head.event_id == last_event_id), None)
    if marker is None:
        return set()
    last = heads[marker]
    return {head.event_id for head in heads[: marker + 1] if head.position <= last.position or head.tx == last.tx}


def unsent(heads: Iterable[EventHead], sent: set[str]) -> list[EventHead]:
    """The events still to send, in stream order."""
    return [head for head in heads if head.event_id not in sent]


def ended(heads: Iterable[EventHead], sent: set[str]) -> bool:
    """True once the terminal event was sent: the stream has nothing more to say."""
    return any(head.type in TERMINAL_TYPES and head.event_id in sent for head in heads)
