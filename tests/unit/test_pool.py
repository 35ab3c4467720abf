"""The sequence pool alone, on a clear callback that records what it was asked to clear."""

from __future__ import annotations

import threading

import pytest

from seqlease.errors import ContextClosedError, PoolExhausted, TooManyWaiters
from seqlease.pool import SequencePool, SlotState

pytestmark = pytest.mark.timeout(30)


class Clears:
    """A clear callback: records ids, and fails for the ids in ``broken``."""

    def __init__(self) -> None:
        self.cleared: list[int] = []
        self.broken: set[int] = set()

    def __call__(self, seq_id: int) -> None:
        if seq_id in self.broken:
            raise RuntimeError(f"cannot clear {seq_id}")
        self.cleared.append(seq_id)


def _release(pool: SequencePool, slot, number: int) -> None:
    assert pool.begin_release(slot, number)
    pool.finish_release(slot)


def test_lowest_id_first_and_every_release_clears():
    clears = Clears()
    pool = SequencePool(3, clear=clears)
    got = [pool.acquire(None, "t") for _ in range(3)]
    assert [slot.seq_id for slot, _ in got] == [0, 1, 2]
    for slot, number in reversed(got):
        _release(pool, slot, number)
    assert clears.cleared == [2, 1, 0]
    assert pool.stats().free == 3


def test_timeout_zero_fails_at_once_with_numbers():
    pool = SequencePool(1, clear=Clears())
    pool.acquire(None, "here")
    with pytest.raises(PoolExhausted, match=r"all 1 sequences are busy"):
        pool.acquire(0, "there")
    assert pool.stats().timeouts == 1


def test_waiters_are_served_first_come_first_served():
    pool = SequencePool(1, clear=Clears())
    slot, number = pool.acquire(None, "first")
    order: list[int] = []
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: order.append(i) or _hold(pool))
        threads.append(t)
    for i, t in enumerate(threads):
        t.start()
        _wait_waiting(pool, i + 1)
    _release(pool, slot, number)
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def _hold(pool: SequencePool) -> None:
    slot, number = pool.acquire(10, "waiter")
    _release(pool, slot, number)


def _wait_waiting(pool: SequencePool, n: int) -> None:
    for _ in range(10000):
        if pool.stats().waiting >= n:
            return
        threading.Event().wait(0.001)
    raise AssertionError("waiter did not queue")


def test_max_waiting_and_close():
    pool = SequencePool(1, clear=Clears(), max_waiting=0)
    pool.acquire(None, "a")
    with pytest.raises(TooManyWaiters, match="max_waiting=0"):
        pool.acquire(1, "b")
    assert pool.close(0) is False  # a lease is out (held by this thread: not waited for)
    with pytest.raises(ContextClosedError):
        pool.acquire(0, "c")


def test_a_slot_that_cannot_be_cleared_is_quarantined_not_reused():
    clears = Clears()
    clears.broken.add(0)
    pool = SequencePool(2, clear=clears)
    slot, number = pool.acquire(None, "a")
    _release(pool, slot, number)
    assert slot.state is SlotState.QUARANTINED
    assert pool.stats().quarantined == 1
    again, _ = pool.acquire(0, "b")
    assert again.seq_id == 1


def test_double_release_and_stale_handles_are_no_ops():
    pool = SequencePool(1, clear=Clears())
    slot, number = pool.acquire(None, "a")
    _release(pool, slot, number)
    assert pool.begin_release(slot, number) is False
    slot2, number2 = pool.acquire(None, "b")
    assert slot2 is slot and number2 == number + 1
    assert not pool.is_current(slot, number)
    assert pool.stats().double_releases == 1


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), 10**400, True, "1"])
def test_bad_timeouts_name_the_argument(timeout):
    pool = SequencePool(1, clear=Clears())
    with pytest.raises((TypeError, ValueError), match="timeout"):
        pool.acquire(timeout, "a")
