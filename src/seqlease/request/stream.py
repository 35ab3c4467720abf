"""What a caller holds while a reply is generated: a sync or an async iterator of text.

Both forms stop the reply when closed from any thread, when the loop over them is left early
(``break``), or when they are dropped: the next generation on the sequence is accepted at once.
One reader at a time: a second thread (or task) reading the same stream gets
:class:`~seqlease.StreamInUseError` instead of a hang.

Both forms are one implementation (:class:`_Stream`): it looks at the channel and says what
to do next, a chunk, the end, or wait for the bell; the sync form waits for the bell by
blocking its thread, the async one by awaiting. Nothing else differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from typing_extensions import Self

from seqlease.errors import StreamInUseError
from seqlease.request.job import Channel, Result

__all__ = ["AsyncGeneration", "Generation"]

#: Submits the reply, given the channel its text and end go to.
Starter = Callable[[Channel], object]


class _Bell(Protocol):
    """What wakes a stream's waiting reader: rung by the worker after every put and the end."""

    def ring(self) -> None:
        """Wake every waiter (from any thread)."""
        ...

    def arm(self) -> int:
        """How often it rang so far: a wait for a later ring never misses one after this."""
        ...


class _ThreadBell:
    """A bell for threads: a ring counter under a condition, so no wake-up is ever lost.

    Not an Event: a waiter that clears one can swallow the ring another thread was about to
    wait for (a reader and a ``result()`` caller wait at once).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._rings = 0

    def ring(self) -> None:
        with self._cond:
            self._rings += 1
            self._cond.notify_all()

    def arm(self) -> int:
        with self._cond:
            return self._rings

    def wait(self, armed: int) -> None:
        """Block until it rang after ``armed`` rings."""
        with self._cond:
            self._cond.wait_for(lambda: self._rings != armed)


class _LoopBell:
    """A bell for one event loop: rung from the worker thread, counted in the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._rings = 0
        self._rung = asyncio.Event()

    def ring(self) -> None:
        # Raises once the loop is closed; the channel then stops ringing (nobody reads).
        self._loop.call_soon_threadsafe(self._count)

    def _count(self) -> None:
        self._rings += 1
        self._rung.set()

    def arm(self) -> int:
        return self._rings

    async def wait(self, armed: int) -> None:
        """Wait, without blocking the loop, until it rang after ``armed`` rings."""
        # Counted and cleared in the loop's thread only: nothing rings between the check and
        # the await, so several tasks may wait at once.
        while self._rings == armed:
            self._rung.clear()
            await self._rung.wait()


@dataclass(frozen=True)
class _Wait:
    """Nothing to take yet: wait for a ring after ``armed``, then look again."""

    armed: int


BellT = TypeVar("BellT", bound=_Bell)


class _Stream(Generic[BellT]):
    """Everything both forms do: the channel, the single-reader rule, stopping, the outcome."""

    def __init__(self, seq_id: int, start: Starter, bell: BellT) -> None:
        self._seq_id = seq_id
        self._bell = bell
        self._reader = threading.Lock()
        # The channel rings the bell, never this object: a dropped stream can be finalized.
        channel = Channel(bell.ring)
        start(channel)
        self._channel = channel

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """One read at a time; a reader who leaves before the end stops the reply."""
        if not self._reader.acquire(blocking=False):
            raise StreamInUseError(
                f"another reader is already iterating this reply of sequence "
                f"{self._seq_id}: read a stream from one thread or task only (use "
                "result() to wait for the whole reply elsewhere)"
            )
        try:
            yield
        except BaseException:  # Ctrl-C or a cancelled task while waiting: nobody reads on
            if not self._channel.ended:
                self._channel.cancel()
            raise
        finally:
            self._reader.release()

    def _next(self) -> str | _Wait | None:
        """The next chunk, ``None`` at the end, or what to wait for; raises the reply's error."""
        armed = self._bell.arm()  # first: a chunk put after this rings again
        ended = self._channel.ended  # before taking: every chunk is put before the end
        if (chunk := self._channel.take_ready()) is not None:
            return chunk
        return None if ended else _Wait(armed)

    def _end(self) -> _Wait | None:
        """What to wait for before the end is known; ``None`` once it is."""
        armed = self._bell.arm()
        return None if self._channel.ended else _Wait(armed)

    def _outcome(self) -> Result:
        """The ended reply's result; raises its error."""
        end = self._channel.wait_end(0)
        if isinstance(end, BaseException):
            raise end
        assert end is not None
        return end

    def _stop(self) -> None:
        """Ask the worker to stop the reply unless it has ended."""
        if not self._channel.ended:
            self._channel.cancel()

    @property
    def finished(self) -> bool:
        """Whether the reply has ended (the worker let go of it)."""
        return self._channel.done.is_set()

    def __del__(self) -> None:
        # Only a flag: a finalizer may run on any thread, even inside the job table's lock.
        if (channel := getattr(self, "_channel", None)) is not None:
            channel.cancelled.set()


class Generation(_Stream[_ThreadBell], Iterator[str]):
    """Text chunks of one reply as they are generated; ``result()`` waits for the whole.

    Stop early with :meth:`close` (from any thread), a ``with`` block, ``break``, or by
    dropping the object: the engine stops this sequence within one step.
    """

    def __init__(self, seq_id: int, start: Starter) -> None:
        """Submit the generation on ``seq_id`` through ``start``."""
        super().__init__(seq_id, start, _ThreadBell())

    def __next__(self) -> str:
        with self._reading():
            while isinstance(step := self._next(), _Wait):
                self._bell.wait(step.armed)
        if step is None:
            raise StopIteration
        return step

    def result(self) -> Result:
        """Wait for the end of the reply and return it (raises the generation's error)."""
        self._ended()
        return self._outcome()

    def close(self) -> None:
        """Stop the generation and return once the engine let go of it (within one step).

        Safe from any thread, also while another thread iterates. :meth:`result` stays
        available (``finish_reason == "cancelled"`` unless it had already ended).
        """
        self._stop()
        # The worker lets go just after the end; a thread may wait for that, a loop may not.
        self._channel.done.wait()

    def _ended(self) -> None:
        while (wait := self._end()) is not None:
            self._bell.wait(wait.armed)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncGeneration(_Stream[_LoopBell], AsyncIterator[str]):
    """The asyncio form of :class:`Generation`; cancelling the reading task stops the reply."""

    def __init__(self, seq_id: int, start: Starter) -> None:
        """Submit the generation on ``seq_id``; must be called in the loop that reads it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "agenerate() and astream() need a running event loop: call them inside "
                "async code, or use generate() / stream() in synchronous code"
            ) from None
        super().__init__(seq_id, start, _LoopBell(loop))

    async def __anext__(self) -> str:
        with self._reading():
            while isinstance(step := self._next(), _Wait):
                await self._bell.wait(step.armed)
        if step is None:
            raise StopAsyncIteration
        return step

    async def result(self) -> Result:
        """Wait (without blocking the loop) for the end of the reply and return it."""
        await self._ended()
        return self._outcome()

    async def aclose(self) -> None:
        """Stop the generation and wait, without blocking the loop, until it has stopped."""
        self._stop()
        # The end is what rings; done, set just after it, wakes nobody. The engine waits for
        # done itself before it touches the sequence again.
        await self._ended()

    async def _ended(self) -> None:
        while (wait := self._end()) is not None:
            await self._bell.wait(wait.armed)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
