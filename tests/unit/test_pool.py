"""The sequence pool alone, on a clear callback that records what it was asked to clear."""

from __future__ import annotations

import asyncio
import threading

import pytest

from seqlease.errors import ContextClosedError, LeaseLeakWarning, PoolExhausted, TooManyWaiters
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


class HeldClear(Clears):
    """A clear callback that waits for ``go`` (bounded) and records its thread."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.go = threading.Event()
        self.threads: list[str] = []

    def __call__(self, seq_id: int) -> None:
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.go.wait(10)
        super().__call__(seq_id)


def test_a_slot_being_cleared_counts_as_clearing_not_quarantined():
    clears = HeldClear()
    pool = SequencePool(2, clear=clears)
    slot, number = pool.acquire(None, "a")
    releaser = threading.Thread(target=_release, args=(pool, slot, number))
    releaser.start()
    assert clears.started.wait(10)
    stats = pool.stats()
    assert (stats.clearing, stats.quarantined, stats.free, stats.leased) == (1, 0, 1, 0)
    clears.go.set()
    releaser.join(10)
    stats = pool.stats()
    assert (stats.clearing, stats.quarantined, stats.free) == (0, 0, 2)


def test_async_releases_clear_on_the_one_janitor_thread_not_a_thread_each():
    clears_on: list[str] = []
    pool = SequencePool(2, clear=lambda _: clears_on.append(threading.current_thread().name))

    async def cycles() -> int:
        threads = threading.active_count()
        for _ in range(20):
            slot, number = await pool.aacquire(None, "a")
            assert pool.begin_release(slot, number)
            await pool.afinish_release(slot)
            threads = max(threads, threading.active_count())
        return threads

    before = threading.active_count()
    assert asyncio.run(asyncio.wait_for(cycles(), 20)) == before
    assert clears_on == ["seqlease-janitor"] * 20
    assert pool.stats().free == 2


def test_an_async_release_completes_when_its_task_is_cancelled():
    clears = HeldClear()
    pool = SequencePool(1, clear=clears)

    async def main() -> None:
        slot, number = await pool.aacquire(None, "a")
        assert pool.begin_release(slot, number)
        task = asyncio.create_task(pool.afinish_release(slot))
        await asyncio.to_thread(clears.started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        clears.go.set()
        again, _ = await pool.aacquire(10, "b")  # the release finished on the janitor
        assert again is slot

    asyncio.run(asyncio.wait_for(main(), 20))
    assert clears.cleared == [0]


def test_aacquire_reclaims_a_dropped_handle_at_once_as_acquire_does():
    clears = Clears()
    pool = SequencePool(1, clear=clears)
    slot, number = pool.acquire(None, "a")
    with pytest.warns(LeaseLeakWarning):
        pool.handle_lost(slot, number, "a")

    async def main() -> int:
        got, _ = await pool.aacquire(0, "b")  # timeout=0: the reclaimed slot, not "busy"
        return got.seq_id

    assert asyncio.run(asyncio.wait_for(main(), 10)) == 0
    assert clears.cleared == [0] and pool.stats().leaked == 1


def test_a_close_off_the_loop_waits_for_the_loops_leases():
    # The server closes its Context when it shuts down, from a worker thread: a close on
    # the loop's own thread would skip every lease of that loop's tasks.
    pool = SequencePool(1, clear=Clears())

    async def main() -> bool:
        slot, number = await pool.aacquire(None, "task")

        async def release_later() -> None:
            await asyncio.sleep(0.2)
            assert pool.begin_release(slot, number)
            await pool.afinish_release(slot)

        releasing = asyncio.create_task(release_later())
        idle = await asyncio.to_thread(pool.close, 10)
        await releasing
        return idle

    assert asyncio.run(asyncio.wait_for(main(), 20)) is True
    assert pool.stats().leased == 0
