"""The collector's batcher: size-bounded batches, retry of transient errors, isolation of bad items, drain."""

from __future__ import annotations

import asyncio

import pytest

from mlp.backoff import Backoff
from results_collector.batcher import Batcher, ItemFailed, ShuttingDown

FAST = Backoff(base_s=0.001, cap_s=0.01, jitter=0.5)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError)


class Store:
    """A write function with scripted failures: records every batch it was given."""

    def __init__(self, fail_times: int = 0, poison: frozenset[int] = frozenset(), down: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.written: list[int] = []
        self.fail_times = fail_times
        self.poison = poison
        self.down = down

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(0)
        if self.down:
            raise OSError("database down")
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionRefusedError("database restarting")
        if self.poison & set(items):
            raise ValueError("refused by the database")
        self.written += items
        return [i * 10 for i in items]


async def test_every_item_gets_its_result_in_batches_of_at_most_max_size() -> None:
    store = Store()
    batcher: Batcher[int, int] = Batcher(store.write, max_size=4, max_wait_s=0.05, is_transient=_transient)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * 10 for i in range(10)]
    assert all(len(b) <= 4 for b in store.batches)
    assert sorted(store.written) == list(range(10))
    await batcher.close(1.0)


async def test_transient_errors_are_retried_until_the_batch_is_written() -> None:
    store = Store(fail_times=3)
    batcher: Batcher[int, int] = Batcher(
        store.write, max_size=10, max_wait_s=0.01, is_transient=_transient, backoff=FAST
    )
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 10, 20, 30, 40]
    assert batcher.retries == 3
    assert sorted(store.written) == list(range(5))
    await batcher.close(1.0)


async def test_a_permanent_error_fails_only_the_bad_item() -> None:
    store = Store(poison=frozenset({3}))
    batcher: Batcher[int, int] = Batcher(store.write, max_size=10, max_wait_s=0.01, is_transient=_transient)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
    assert isinstance(outcomes[3], ItemFailed)
    assert isinstance(outcomes[3].__cause__, ValueError)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 10, 20, 40, 50]
    assert sorted(store.written) == [0, 1, 2, 4, 5]
    await batcher.close(1.0)


async def test_close_writes_what_is_waiting_when_it_can() -> None:
    store = Store()
    batcher: Batcher[int, int] = Batcher(store.write, max_size=100, max_wait_s=60, is_transient=_transient)
    waiting = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close(5.0)  # does not wait for the 60 s batch window
    assert [await w for w in waiting] == [0, 10, 20]
    with pytest.raises(ShuttingDown):
        await batcher.submit(99)


async def test_close_gives_up_on_a_database_that_stays_down_and_nothing_is_lost_silently() -> None:
    store = Store(down=True)
    batcher: Batcher[int, int] = Batcher(
        store.write, max_size=2, max_wait_s=0.001, is_transient=_transient, backoff=FAST
    )
    waiting = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    while batcher.retries < 3:
        await asyncio.sleep(0.001)
    await batcher.close(0.05)
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, ShuttingDown) for o in outcomes)  # the caller requeues them
    assert store.written == []
