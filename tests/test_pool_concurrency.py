"""Threads and asyncio tasks hammering one Context: no leak, no double lease, FIFO service."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest

import seqlease
from helpers import fill, free_slots_are_empty, settle, wait_for
from tiny_model import tiny_model_path


@pytest.fixture
def ctx3():
    with seqlease.Context(tiny_model_path(), n_threads=1, sequences=3, n_ctx=64, n_batch=32) as ctx:
        yield ctx


class LeaseTracker:
    """Detects a sequence handed to two holders at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[int] = set()
        self.double_leases = 0
        self.served = 0

    def enter(self, seq_id: int) -> None:
        with self.lock:
            if seq_id in self.active:
                self.double_leases += 1
            self.active.add(seq_id)
            self.served += 1

    def leave(self, seq_id: int) -> None:
        with self.lock:
            self.active.discard(seq_id)


def _assert_clean(ctx: seqlease.Context, size: int) -> seqlease.PoolStats:
    stats = settle(ctx)
    assert stats.leased == 0
    assert stats.free == size
    assert stats.waiting == 0
    assert stats.acquires == stats.releases
    assert free_slots_are_empty(ctx) == []
    return stats


class _Boom(Exception):
    pass


def test_thread_stress_no_leak_no_double_lease(ctx3):
    tracker = LeaseTracker()
    errors: list[BaseException] = []
    outcomes = {"ok": 0, "timeout": 0, "boom": 0}
    count_lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            timeout = rng.choice([0, 0.001, 0.05, None])
            try:
                with ctx3.lease(timeout=timeout) as seq:
                    tracker.enter(seq.id)
                    try:
                        if rng.random() < 0.5:
                            fill(seq, rng.randint(1, 3))
                        time.sleep(rng.uniform(0, 0.002))
                        if rng.random() < 0.2:
                            raise _Boom
                    finally:
                        tracker.leave(seq.id)
                outcome = "ok"
            except seqlease.PoolExhausted:
                outcome = "timeout"
            except _Boom:
                outcome = "boom"
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            with count_lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert tracker.double_leases == 0
    stats = _assert_clean(ctx3, 3)
    assert stats.timeouts == outcomes["timeout"]
    assert stats.acquires == outcomes["ok"] + outcomes["boom"] == tracker.served
    assert outcomes["ok"] and outcomes["boom"] and outcomes["timeout"]


def test_threads_are_served_in_arrival_order(ctx3):
    held = [ctx3.acquire() for _ in range(3)]
    order: list[int] = []

    def wait(i: int) -> None:
        with ctx3.lease(timeout=30):
            order.append(i)
            time.sleep(0.001)

    threads = []
    for i in range(32):
        t = threading.Thread(target=wait, args=(i,))
        t.start()
        threads.append(t)
        wait_for(lambda i=i: ctx3.stats().waiting == i + 1)
    for seq in held:
        seq.release()
    for t in threads:
        t.join(30)
    # Three sequences serve the queue concurrently, so neighbours may finish in either order,
    # but nobody may start before someone who queued more than two places earlier.
    for position, i in enumerate(order):
        assert abs(position - i) <= 2, order
    _assert_clean(ctx3, 3)


def test_single_sequence_serves_strictly_fifo():
    with seqlease.Context(tiny_model_path(), n_threads=1, sequences=1, n_ctx=64, n_batch=32) as ctx:
        first = ctx.acquire()
        order: list[int] = []

        def wait(i: int) -> None:
            with ctx.lease(timeout=30):
                order.append(i)

        threads = []
        for i in range(32):
            t = threading.Thread(target=wait, args=(i,))
            t.start()
            threads.append(t)
            wait_for(lambda i=i: ctx.stats().waiting == i + 1)
        first.release()
        for t in threads:
            t.join(30)
        assert order == list(range(32))
        assert ctx.stats().longest_wait > 0
        _assert_clean(ctx, 1)


def test_asyncio_cancellation_at_random_points(ctx3):
    tracker = LeaseTracker()
    rng = random.Random(7)

    async def user(i: int) -> None:
        async with ctx3.alease(timeout=rng.choice([None, 0, 0.01])) as seq:
            tracker.enter(seq.id)
            try:
                fill(seq, 1)
                await asyncio.sleep(rng.uniform(0, 0.003))
            finally:
                tracker.leave(seq.id)

    async def main() -> dict[str, int]:
        results = {"done": 0, "cancelled": 0, "busy": 0}
        for _ in range(20):
            tasks = [asyncio.create_task(user(i)) for i in range(12)]
            await asyncio.sleep(0)
            # Cancel some while they wait, some inside the block, some before they start.
            for task in rng.sample(tasks, 6):
                await asyncio.sleep(rng.uniform(0, 0.002))
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, asyncio.CancelledError):
                    results["cancelled"] += 1
                elif isinstance(outcome, seqlease.PoolExhausted):
                    results["busy"] += 1
                elif outcome is None:
                    results["done"] += 1
                else:
                    raise outcome
        return results

    results = asyncio.run(main())
    assert tracker.double_leases == 0
    assert results["cancelled"] and results["done"] and results["busy"]
    stats = _assert_clean(ctx3, 3)
    assert stats.acquires == tracker.served


def test_asyncio_waiters_fifo_with_cancelled_ones_skipped():
    async def main(ctx: seqlease.Context) -> list[int]:
        first = await ctx.aacquire()
        order: list[int] = []

        async def wait(i: int) -> None:
            async with ctx.alease():
                order.append(i)
                await asyncio.sleep(0)

        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(wait(i)))
            await asyncio.sleep(0)
        assert ctx.stats().waiting == 10
        for i in (2, 5, 6):
            tasks[i].cancel()
        await asyncio.sleep(0)
        first.release()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order

    with seqlease.Context(tiny_model_path(), n_threads=1, sequences=1, n_ctx=64, n_batch=32) as ctx:
        assert asyncio.run(main(ctx)) == [0, 1, 3, 4, 7, 8, 9]
        _assert_clean(ctx, 1)


def test_keyboard_interrupt_inside_lease_releases(ctx3):
    with pytest.raises(KeyboardInterrupt), ctx3.lease() as seq:
        fill(seq)
        raise KeyboardInterrupt
    assert seq.released
    _assert_clean(ctx3, 3)


def test_keyboard_interrupt_while_waiting_leaves_the_queue(ctx3):
    # Python turns SIGINT into KeyboardInterrupt only when it was not ignored at start-up, and
    # a job started in the background (`cmd &` in a script, as CI may) starts with it ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    held = [ctx3.acquire() for _ in range(3)]
    # A real SIGINT, as from Ctrl-C: it must interrupt the blocked wait, not just be noticed
    # after the timeout.
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ctx3.acquire(timeout=10)
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5
    assert ctx3.stats().waiting == 0
    for seq in held:
        seq.release()
    _assert_clean(ctx3, 3)
