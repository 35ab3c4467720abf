"""Callers queued for a sequence, thread or asyncio task alike, and the pure hand-off rule."""

from __future__ import annotations

import abc
import asyncio
import heapq
import threading
from collections import deque

from seqlease.loop_bridge import wake_from_thread
from seqlease.pool.slot import Slot

__all__ = ["AsyncWaiter", "ThreadWaiter", "Waiter", "assign"]


class Waiter(abc.ABC):
    """One queued request. The pool fills in ``slot`` or ``error`` under its lock, then wakes it."""

    __slots__ = ("enqueued_at", "error", "origin", "slot", "thread")

    def __init__(self, origin: str, enqueued_at: float) -> None:
        self.origin = origin
        self.thread = threading.current_thread()
        self.enqueued_at = enqueued_at
        self.slot: Slot | None = None
        self.error: BaseException | None = None

    @abc.abstractmethod
    def wake(self) -> bool:
        """Tell the waiter its answer is ready; ``False`` when it can no longer be told."""


class ThreadWaiter(Waiter):
    """A waiter blocked in a thread."""

    __slots__ = ("event",)

    def __init__(self, origin: str, enqueued_at: float) -> None:
        super().__init__(origin, enqueued_at)
        self.event = threading.Event()

    def wake(self) -> bool:
        """Set the event the thread waits on."""
        self.event.set()
        return True


class AsyncWaiter(Waiter):
    """A waiter awaiting in an event loop, possibly not the thread that hands the slot over."""

    __slots__ = ("future", "loop")

    def __init__(self, origin: str, enqueued_at: float) -> None:
        super().__init__(origin, enqueued_at)
        self.loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self.loop.create_future()

    def wake(self) -> bool:
        """Resolve the future from any thread; fails only when the loop is already closed."""
        return wake_from_thread(self.loop, self.future)


def assign(free: list[Slot], waiters: deque[Waiter]) -> list[tuple[Waiter, Slot]]:
    """Pair free slots (a heap, lowest id first) with waiters, oldest first; mutates both.

    The whole fairness policy of the pool: no free slot stays idle while someone waits, and
    nobody is served before a waiter that arrived earlier.
    """
    pairs = []
    while free and waiters:
        pairs.append((waiters.popleft(), heapq.heappop(free)))
    return pairs
