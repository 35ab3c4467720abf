"""What a caller holds while a reply is generated: a sync or an async iterator of text.

Both forms stop the reply when closed from any thread, when the loop over them is left early
(``break``), or when they are dropped: the next generation on the sequence is accepted at once.
One reader at a time: a second thread (or task) reading the same stream gets
:class:`~seqlease.StreamInUseError` instead of a hang.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType

from typing_extensions import Self

from seqlease.errors import StreamInUseError
from seqlease.request.job import Channel, Result

__all__ = ["AsyncGeneration", "Generation"]

#: Submits the reply, given the channel its text and end go to.
Starter = Callable[[Channel], object]


def _outcome(channel: Channel) -> Result:
    """The finished reply's result; raises its error."""
    end = channel.wait_end()
    if isinstance(end, BaseException):
        raise end
    assert end is not None
    return end


class _Stream:
    """What both forms share: the channel, the single-reader rule and stopping."""

    def __init__(self, seq_id: int, channel: Channel) -> None:
        self._seq_id = seq_id
        self._channel = channel
        self._reader = threading.Lock()

    def _enter_read(self) -> None:
        if not self._reader.acquire(blocking=False):
            raise StreamInUseError(
                f"another reader is already iterating this reply of sequence "
                f"{self._seq_id}: read a stream from one thread or task only (use "
                "result() to wait for the whole reply elsewhere)"
            )

    @property
    def finished(self) -> bool:
        """Whether the reply has ended (the worker let go of it)."""
        return self._channel.done.is_set()

    def __del__(self) -> None:
        # Only a flag: a finalizer may run on any thread, even inside the job table's lock.
        if (channel := getattr(self, "_channel", None)) is not None:
            channel.cancelled.set()


class Generation(_Stream, Iterator[str]):
    """Text chunks of one reply as they are generated; ``result()`` waits for the whole.

    Stop early with :meth:`close` (from any thread), a ``with`` block, ``break``, or by
    dropping the object: the engine stops this sequence within one step.
    """

    def __init__(self, seq_id: int, start: Starter) -> None:
        """Submit the generation on ``seq_id`` through ``start``."""
        channel = Channel()
        start(channel)
        super().__init__(seq_id, channel)

    def __next__(self) -> str:
        self._enter_read()
        try:
            chunk = self._channel.take()
        except KeyboardInterrupt:  # Ctrl-C while waiting: stop the reply too
            self._channel.cancel()
            raise
        finally:
            self._reader.release()
        if chunk is None:
            raise StopIteration
        return chunk

    def result(self) -> Result:
        """Wait for the end of the reply and return it (raises the generation's error)."""
        return _outcome(self._channel)

    def close(self) -> None:
        """Stop the generation and return once the engine let go of it (within one step).

        Safe from any thread, also while another thread iterates. :meth:`result` stays
        available (``finish_reason == "cancelled"`` unless it had already ended).
        """
        if not self._channel.done.is_set():
            self._channel.cancel()
            self._channel.done.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncGeneration(_Stream, AsyncIterator[str]):
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
        ready = asyncio.Event()
        self._ready = ready

        # The notifier refers to the loop and the event only, never to this object.
        def notify() -> None:
            loop.call_soon_threadsafe(ready.set)

        channel = Channel(notify)
        start(channel)
        super().__init__(seq_id, channel)

    async def __anext__(self) -> str:
        self._enter_read()
        channel = self._channel
        try:
            while True:
                self._ready.clear()
                ended = channel.ended  # read first: every chunk is put before the end
                if (chunk := channel.take_ready()) is not None:
                    return chunk
                if ended:
                    raise StopAsyncIteration
                await self._ready.wait()
        except asyncio.CancelledError:  # the reading task was cancelled: stop the reply too
            self._channel.cancel()
            raise
        finally:
            self._reader.release()

    async def result(self) -> Result:
        """Wait (without blocking the loop) for the end of the reply and return it."""
        await self._wait_done()
        return _outcome(self._channel)

    async def aclose(self) -> None:
        """Stop the generation and wait, without blocking the loop, until it has stopped."""
        if not self._channel.ended:
            self._channel.cancel()
            await self._wait_done()

    async def _wait_done(self) -> None:
        # The channel's end is what wakes this loop (done is set just after it, and wakes
        # nobody); the worker has forgotten the job by then.
        channel = self._channel
        while not channel.ended:
            self._ready.clear()
            if channel.ended:
                return
            await self._ready.wait()
