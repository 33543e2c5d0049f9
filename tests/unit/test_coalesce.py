"""Coalescer: calls of one loop turn form one batch per key, each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from mlp.coalesce import Coalescer


class Recorder:
    def __init__(self, fail_batch: bool = False) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.fail_batch = fail_batch

    async def send(self, key: str, items: list[int]) -> list[int | BaseException]:
        self.batches.append((key, list(items)))
        await asyncio.sleep(0)
        if self.fail_batch:
            raise ConnectionError("down")
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_calls_of_one_turn_go_out_as_one_batch_per_key_with_their_own_results() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_batch=100, max_in_flight=4, name="test")
    calls = [coalescer.call("a" if i < 6 else "b", i) for i in range(10)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sorted(recorder.batches) == [("a", [0, 1, 2, 3, 4, 5]), ("b", [6, 7, 8, 9])]
    assert results[0] == 0
    assert results[4] == 40
    assert results[8] == 80
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "odd 1"
    assert isinstance(results[9], ValueError)


async def test_batches_are_cut_at_max_batch_and_later_turns_form_new_batches() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_batch=4, max_in_flight=4, name="test")
    await asyncio.gather(*(coalescer.call("k", i * 2) for i in range(10)))
    assert [len(items) for _, items in recorder.batches] == [4, 4, 2]
    assert await coalescer.call("k", 100) == 1000  # alone: a batch of one, no timer to wait out
    assert recorder.batches[-1] == ("k", [100])


async def test_a_failed_send_fails_every_caller_of_the_batch() -> None:
    failing = Recorder(fail_batch=True)
    coalescer: Coalescer[str, int, int] = Coalescer(failing.send, max_batch=8, max_in_flight=1, name="test")
    results = await asyncio.gather(*(coalescer.call("k", i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_cancelled_caller_leaves_the_others_their_results() -> None:
    recorder = Recorder()
    coalescer: Coalescer[str, int, int] = Coalescer(recorder.send, max_batch=8, max_in_flight=1, name="test")
    first = asyncio.ensure_future(coalescer.call("k", 2))
    second = asyncio.ensure_future(coalescer.call("k", 4))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second == 40
    with pytest.raises(asyncio.CancelledError):
        await first
    assert recorder.batches == [("k", [4])]  # the cancelled call was dropped before sending


async def test_calls_made_while_a_batch_is_in_flight_go_out_together_when_it_returns() -> None:
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        batches.append(list(items))
        await release.wait()
        return list(items)

    coalescer: Coalescer[str, int, int] = Coalescer(send, max_batch=100, max_in_flight=1, name="test")
    first = asyncio.ensure_future(coalescer.call("k", 1))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(coalescer.call("k", i)) for i in range(2, 6)]
    await asyncio.sleep(0.01)
    assert batches == [[1]]  # an idle coalescer sends at once; the rest wait for the batch ahead
    release.set()
    assert await asyncio.gather(first, *later) == [1, 2, 3, 4, 5]
    assert batches == [[1], [2, 3, 4, 5]]
    assert coalescer.in_flight == 0


async def test_a_batch_is_sent_in_the_context_of_its_first_call() -> None:
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")
    seen: list[str] = []

    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        seen.append(caller.get())  # e.g. the current span a client span would be parented to
        return list(items)

    coalescer: Coalescer[str, int, int] = Coalescer(send, max_batch=10, max_in_flight=1, name="test")

    async def call_as(name: str, item: int) -> int:
        caller.set(name)
        return await coalescer.call("k", item)

    assert list(await asyncio.gather(call_as("first", 1), call_as("second", 2))) == [1, 2]
    assert seen == ["first"]


def test_max_batch_and_max_in_flight_must_be_positive() -> None:
    async def send(key: str, items: list[int]) -> list[int | BaseException]:
        return list(items)

    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(send, max_batch=0, max_in_flight=1, name="test")
    with pytest.raises(ValueError, match="max_in_flight"):
        Coalescer(send, max_batch=1, max_in_flight=0, name="test")
