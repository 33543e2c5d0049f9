"""mlp.heap.settle_after_start: start-up objects frozen, young collections rarer, cycles still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from mlp import heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_garbage_is_collected_and_survivors_frozen() -> None:
    gc.disable()  # only settle_after_start may collect the cycle made before it
    try:
        before = _cycle()
        assert before() is not None
        heap.settle_after_start()
        assert before() is None
    finally:
        gc.enable()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD


@pytest.mark.usefixtures("restored_gc")
def test_cycles_made_later_are_still_collected_automatically() -> None:
    heap.settle_after_start()
    later = _cycle()
    survivors = []
    for i in range(heap.YOUNG_THRESHOLD * 3):  # enough net allocations to pass the young threshold
        survivors.append([i])
        if later() is None:
            break
    assert later() is None, "no automatic collection reclaimed the cycle"
