"""Reading server-sent events in tests: the messages of a stream's text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    id: str | None
    event: str | None
    data: str


def messages(text: str) -> list[Message]:
    """The SSE messages of a stream's text (comments and retry fields left out)."""
    found: list[Message] = []
    for block in text.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
        if "data" in fields:
            data = "\n".join(fields["data"])
            found.append(Message(fields.get("id", [None])[0], fields.get("event", [None])[0], data))
    return found
