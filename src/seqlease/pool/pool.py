"""The sequence pool: FIFO hand-off of slots to threads and asyncio tasks, from one source.

Every state change happens under one lock and keeps these invariants:

* each slot is in exactly one state (free, leased, clearing, quarantined);
* a free slot is never idle while someone waits: releasing hands the slot straight to the oldest
  waiter, so a newcomer can never overtake a queued caller;
* a slot goes back into service only after its memory was cleared.

The native work (clearing a sequence's memory) is done by the ``clear`` callback, outside the
lock: by the releasing thread, or, for an asyncio release, by the pool's one janitor thread
(never a thread per release). Handles dropped without release are reported by a weakref
finalizer, which may run inside any thread at any moment (even one holding this lock): it only
puts the reclaim on a ``SimpleQueue`` (safe there by design) for the janitor to run.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable

from seqlease.checks import check_timeout
from seqlease.errors import ContextClosedError, LeaseLeakWarning, PoolExhausted, TooManyWaiters
from seqlease.loop_bridge import wake_from_thread
from seqlease.pool.slot import Slot, SlotState
from seqlease.pool.stats import Holder, PoolStats
from seqlease.pool.waiter import AsyncWaiter, ThreadWaiter, Waiter, assign

__all__ = ["SequencePool"]

logger = logging.getLogger("seqlease.pool")

_STOP = None  # janitor sentinel
_Work = Callable[[], None]


class SequencePool:
    """A fixed set of sequence slots, leased one at a time, always returned cleared."""

    def __init__(
        self,
        size: int,
        *,
        clear: Callable[[int], None],
        max_waiting: int | None = None,
        on_idle_after_close: Callable[[], None] | None = None,
    ) -> None:
        """Create ``size`` free slots; ``clear(seq_id)`` empties one sequence's memory."""
        self.size = size
        self._clear = clear
        self._max_waiting = max_waiting
        self._on_idle_after_close = on_idle_after_close
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a slot changed state
        self._slots = tuple(Slot(i) for i in range(size))
        # A heap: the lowest free id goes out first, so the ids in use stay together and the
        # engine's sorted batch rows stay one forward pass in llama.cpp (ids 0..N-1).
        self._free: list[Slot] = list(self._slots)
        self._waiters: deque[Waiter] = deque()
        self._closed = False
        self._idle_reported = False
        self._acquires = self._releases = self._timeouts = self._rejected = 0
        self._leaked = self._double_releases = 0
        self._longest_wait = 0.0
        # The janitor's work, in order: reclaims of dropped handles and asyncio releases.
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._janitor_stopped = False  # under the lock: the stop is queued, nothing after it
        # Started now, not on the first leak: starting a thread from inside a finalizer could
        # deadlock on the interpreter's own thread-bookkeeping lock. A daemon: at exit an
        # unfinished release has nothing left to protect, the process's memory goes with it.
        self._janitor = threading.Thread(target=self._janitor_loop, name="seqlease-janitor")
        self._janitor.daemon = True
        self._janitor.start()

    # -- acquisition ------------------------------------------------------------------------

    def acquire(self, timeout: float | None, origin: str) -> tuple[Slot, int]:
        """Lease a slot from a thread, waiting up to ``timeout`` seconds (``None``: forever)."""
        timeout = check_timeout(timeout)
        self._run_queued()  # reclaims first, so that a dropped handle's slot can be leased now
        with self._lock:
            got = self._admit(timeout, origin, ThreadWaiter)
        if isinstance(got, Slot):
            return self._granted(got, 0.0)
        assert isinstance(got, ThreadWaiter)
        try:
            got.event.wait(timeout)
        except BaseException:
            self._abandon(got)
            raise
        return self._collect(got, timeout)

    async def aacquire(self, timeout: float | None, origin: str) -> tuple[Slot, int]:
        """Lease a slot from an asyncio task; cancellation at any point leaks nothing."""
        timeout = check_timeout(timeout)
        if not self._work.empty():  # as acquire() does, without clearing on the event loop
            await self._on_janitor(lambda: None)
        with self._lock:
            got = self._admit(timeout, origin, AsyncWaiter)
        if isinstance(got, Slot):
            return self._granted(got, 0.0)
        assert isinstance(got, AsyncWaiter)
        try:
            await asyncio.wait_for(got.future, timeout)
        except asyncio.TimeoutError:
            pass  # _collect decides: the slot may have arrived just as the time ran out
        except BaseException:
            self._abandon(got)
            raise
        return self._collect(got, timeout)

    def _admit(
        self, timeout: float | None, origin: str, make_waiter: Callable[[str, float], Waiter]
    ) -> Slot | Waiter:
        """Under the lock: take a free slot, or queue a waiter, or refuse at once."""
        if self._closed:
            self._rejected += 1
            raise ContextClosedError("the context is closed: create a new Context to lease again")
        now = time.monotonic()
        if self._free:  # by the hand-off invariant, nobody is waiting
            slot = heapq.heappop(self._free)
            self._lease(slot, origin, threading.current_thread(), now)
            return slot
        if timeout == 0:
            self._timeouts += 1
            raise self._exhausted(timeout, now)
        if self._max_waiting is not None and len(self._waiters) >= self._max_waiting:
            self._rejected += 1
            raise TooManyWaiters(
                f"{len(self._waiters)} callers already wait for one of {self.size} sequences "
                f"(max_waiting={self._max_waiting}): answer 'busy, try again' or raise "
                "max_waiting"
            )
        waiter = make_waiter(origin, now)
        self._waiters.append(waiter)
        return waiter

    def _collect(self, waiter: Waiter, timeout: float | None) -> tuple[Slot, int]:
        """After a wait: the slot that was handed over, or the error, or a timeout."""
        with self._lock:
            slot, error = waiter.slot, waiter.error
            if slot is None and error is None:
                self._waiters.remove(waiter)
                self._timeouts += 1
                raise self._exhausted(timeout, time.monotonic())
        if error is not None:
            raise error
        assert slot is not None
        return self._granted(slot, slot.leased_at - waiter.enqueued_at)

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter was interrupted or cancelled: leave the queue, or give back its slot."""
        with self._lock:
            slot = waiter.slot
            if slot is None:
                if waiter.error is None:
                    self._waiters.remove(waiter)
                return
            # Handed over but never used: its memory is still empty, so no clearing is needed.
            self._acquires -= 1
            slot.state = SlotState.FREE
            heapq.heappush(self._free, slot)
            self._dispatch()

    def _granted(self, slot: Slot, waited: float) -> tuple[Slot, int]:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "acquired sequence %d after waiting %.1f ms (%s)",
                slot.seq_id,
                waited * 1000,
                slot.origin,
            )
        return slot, slot.lease_number

    def _lease(self, slot: Slot, origin: str, thread: threading.Thread, now: float) -> None:
        """Under the lock: ``slot`` now belongs to a new owner, under a new lease number."""
        slot.lease_number += 1
        slot.state = SlotState.LEASED
        slot.origin = origin
        slot.thread = thread
        slot.leased_at = now
        self._acquires += 1

    def _dispatch(self) -> None:
        """Under the lock: hand free slots to waiters, oldest first."""
        now = time.monotonic()
        while pairs := assign(self._free, self._waiters):
            for waiter, slot in pairs:
                self._lease(slot, waiter.origin, waiter.thread, now)
                self._longest_wait = max(self._longest_wait, now - waiter.enqueued_at)
                waiter.slot = slot
                if not waiter.wake():  # its event loop is gone: the slot goes to the next one
                    waiter.slot = None
                    self._acquires -= 1
                    slot.state = SlotState.FREE
                    heapq.heappush(self._free, slot)

    # -- release ----------------------------------------------------------------------------

    def is_current(self, slot: Slot, lease_number: int) -> bool:
        """Whether a handle of lease ``lease_number`` still owns ``slot`` (lock-free read)."""
        return slot.lease_number == lease_number and slot.state is SlotState.LEASED

    def begin_release(self, slot: Slot, lease_number: int) -> bool:
        """Claim the right to release; ``False`` (and counted) for a second release."""
        with self._lock:
            if slot.lease_number != lease_number or slot.state is not SlotState.LEASED:
                self._double_releases += 1
                return False
            slot.state = SlotState.CLEARING
            return True

    def finish_release(self, slot: Slot, *, reclaimed: bool = False) -> None:
        """Clear the slot's memory, then hand it to the oldest waiter or the free list."""
        cleared = False
        try:
            self._clear(slot.seq_id)
            cleared = True
        except Exception:
            logger.exception("could not clear sequence %d: it is quarantined", slot.seq_id)
        finally:
            # Runs on KeyboardInterrupt too: the slot is never left in limbo.
            self._settle(slot, cleared, reclaimed)

    async def afinish_release(self, slot: Slot) -> None:
        """:meth:`finish_release` on the janitor thread; it completes even if we are cancelled.

        Clearing may wait for the engine to finish a step, which an event loop must not.
        Not the loop's default executor: its queued work is dropped when the awaiting task is
        cancelled, and it may be busy with the application's own blocking calls.
        """
        await self._on_janitor(functools.partial(self.finish_release, slot))

    async def _on_janitor(self, work: _Work) -> None:
        """Run ``work`` after everything queued before it, on the janitor; await its end."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def job() -> None:
            try:
                work()
            finally:
                wake_from_thread(loop, done)

        with self._lock:
            inline = self._janitor_stopped  # closed and idle: nothing left that could wait
            if not inline:
                self._work.put(job)
        if inline:
            job()
        await asyncio.shield(done)

    def _settle(self, slot: Slot, cleared: bool, reclaimed: bool) -> None:
        with self._lock:
            held = time.monotonic() - slot.leased_at
            self._releases += 1
            self._leaked += reclaimed
            if cleared:
                slot.state = SlotState.FREE
                heapq.heappush(self._free, slot)
                self._dispatch()
            else:
                slot.state = SlotState.QUARANTINED
            self._changed.notify_all()
            idle_now = self._closed and self._report_idle()
        if logger.isEnabledFor(logging.INFO):
            logger.info("released sequence %d after %.1f ms", slot.seq_id, held * 1000)
        if idle_now and self._on_idle_after_close is not None:
            self._on_idle_after_close()

    # -- forgotten handles ------------------------------------------------------------------

    def handle_lost(self, slot: Slot, lease_number: int, origin: str) -> None:
        """Finalizer of a handle dropped while leased. Takes no lock: see the module doc."""
        if slot.lease_number != lease_number or slot.state is not SlotState.LEASED:
            return  # released normally after all (racy read; begin_release re-checks)
        # Queue before warning: under ``-W error`` the warning raises, here and nowhere else.
        self._work.put(functools.partial(self._reclaim, slot, lease_number))
        warnings.warn(
            f"sequence {slot.seq_id} leased at {origin} was never released; seqlease reclaimed "
            "it. Use `with ctx.lease() as seq:` or call seq.release() in a finally block",
            LeaseLeakWarning,
            stacklevel=2,
        )

    def _reclaim(self, slot: Slot, lease_number: int) -> None:
        with self._lock:
            if slot.lease_number != lease_number or slot.state is not SlotState.LEASED:
                return
            slot.state = SlotState.CLEARING
        self.finish_release(slot, reclaimed=True)

    def _run_queued(self) -> None:
        """Run the janitor's queued work on this thread, so stats and leases see it at once."""
        while not self._work.empty():
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._work.put(item)  # the janitor's, not ours
                return
            item()

    def _janitor_loop(self) -> None:
        while (item := self._work.get()) is not _STOP:
            item()

    # -- closing and stats ------------------------------------------------------------------

    def _busy(self) -> bool:
        return any(s.state in (SlotState.LEASED, SlotState.CLEARING) for s in self._slots)

    def close(self, timeout: float | None) -> bool:
        """Refuse new leases, fail every waiter, and wait for leases held by other threads.

        Returns ``True`` when no lease is out any more; otherwise ``on_idle_after_close`` runs
        when the last one comes back (it may also run, once, if a lease came back during the
        wait: the resource it frees must tolerate a second free). Leases held by the calling
        thread are not waited for: that would wait for ourselves.
        """
        timeout = check_timeout(timeout)
        self._run_queued()
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        with self._lock:
            if not self._closed:
                self._closed = True
                for waiter in self._waiters:
                    waiter.error = ContextClosedError("the context was closed while waiting")
                    waiter.wake()
                self._waiters.clear()
            while any(
                s.state is SlotState.CLEARING or (s.state is SlotState.LEASED and s.thread != me)
                for s in self._slots
            ):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._changed.wait(remaining)
            self._report_idle()
            # Idle even if a releasing thread reported it first: the caller frees too
            # (idempotently), so close() returns only once native memory is gone.
            return not self._busy()

    def _report_idle(self) -> bool:
        """Under the lock, once closed: ``True`` exactly once, when the last lease is back."""
        if self._idle_reported or self._busy():
            return False
        self._idle_reported = True
        self._janitor_stopped = True
        self._work.put(_STOP)
        return True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def slots(self) -> tuple[Slot, ...]:
        """All slots, for inspection (their fields change under the lock)."""
        return self._slots

    def stats(self) -> PoolStats:
        """A consistent snapshot, after reclaiming whatever finalizers reported."""
        self._run_queued()
        with self._lock:
            now = time.monotonic()
            states = [s.state for s in self._slots]
            return PoolStats(
                size=self.size,
                leased=states.count(SlotState.LEASED),
                free=len(self._free),
                quarantined=states.count(SlotState.QUARANTINED),
                clearing=states.count(SlotState.CLEARING),
                waiting=len(self._waiters),
                acquires=self._acquires,
                releases=self._releases,
                timeouts=self._timeouts,
                rejected=self._rejected,
                leaked=self._leaked,
                double_releases=self._double_releases,
                longest_wait=self._longest_wait,
                holders=self._holders(now),
            )

    def _holders(self, now: float) -> tuple[Holder, ...]:
        return tuple(
            Holder(s.seq_id, s.origin, now - s.leased_at, s.thread.name if s.thread else "?")
            for s in self._slots
            if s.state is SlotState.LEASED
        )

    def _exhausted(self, timeout: float | None, now: float) -> PoolExhausted:
        when = "right now (timeout=0)" if timeout == 0 else f"within {timeout:g} s"
        holders = "; ".join(h.describe() for h in self._holders(now)) or "none"
        out = self.size - len(self._holders(now))
        extra = f", {out} being cleared or quarantined" if out else ""
        return PoolExhausted(
            f"no free sequence {when}: all {self.size} sequences are busy (held: {holders}"
            f"{extra}); {len(self._waiters)} other callers waiting. Release leases sooner, "
            f"raise sequences= (now {self.size}), or wait longer"
        )
