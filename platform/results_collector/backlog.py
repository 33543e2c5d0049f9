"""What the collector holds in memory while Redis is slow or away, counted in bytes (pure: no I/O).

The sizes are what CPython holds for the objects (``sys.getsizeof`` of each string, dict and tuple): an
estimate that errs high (shared strings are counted once per holder), so a bound in bytes is a bound on
the process's memory. The policies at the bound live with their queues (cache_sync, follow_up).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

# A status cache update: (request_id, status, fields).
Update = tuple[str, str, Mapping[str, str]]

MIB = 1024 * 1024
# Per remembered request id (a dict slot and its hash entry), on top of the string itself.
ID_OVERHEAD_BYTES = 104


def update_bytes(update: Update) -> int:
    request_id, status, fields = update
    return (
        sys.getsizeof(update)
        + sys.getsizeof(request_id)
        + sys.getsizeof(status)
        + sys.getsizeof(fields)
        + sum(sys.getsizeof(name) + sys.getsizeof(value) for name, value in fields.items())
    )


def id_bytes(request_id: str) -> int:
    return sys.getsizeof(request_id) + ID_OVERHEAD_BYTES


class ByteDeque(Generic[T]):
    """A FIFO that keeps the sum of its items' sizes (``size_of`` is asked once per item)."""

    def __init__(self, size_of: Callable[[T], int]) -> None:
        self._items: deque[tuple[T, int]] = deque()
        self._size_of = size_of
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        return (item for item, _ in self._items)

    def append(self, item: T) -> None:
        size = self._size_of(item)
        self._items.append((item, size))
        self.bytes += size

    def popleft(self) -> T:
        item, size = self._items.popleft()
        self.bytes -= size
        return item

    def take(self, n: int) -> list[T]:
        """Up to ``n`` items from the front."""
        return [self.popleft() for _ in range(min(n, len(self._items)))]

    def put_back(self, items: Iterable[T]) -> None:
        """Items taken from the front, back in front, in their order (a write that failed)."""
        for item in reversed(list(items)):
            size = self._size_of(item)
            self._items.appendleft((item, size))
            self.bytes += size


class IdSet:
    """Request ids in arrival order, deduplicated, with their bytes."""

    def __init__(self) -> None:
        self._ids: dict[str, None] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __bool__(self) -> bool:
        return bool(self._ids)

    def add(self, request_id: str) -> None:
        if request_id not in self._ids:
            self._ids[request_id] = None
            self.bytes += id_bytes(request_id)

    def take(self, n: int) -> list[str]:
        taken: list[str] = []
        for request_id in self._ids:
            if len(taken) >= n:
                break
            taken.append(request_id)
        for request_id in taken:
            del self._ids[request_id]
            self.bytes -= id_bytes(request_id)
        return taken

    def clear(self) -> None:
        self._ids.clear()
        self.bytes = 0
