"""What a caller holds while a reply is generated: a sync or an async iterator of text."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType

from typing_extensions import Self

from seqlease.engine.job import Event, Job, Result
from seqlease.errors import SeqleaseError

__all__ = ["AsyncGeneration", "Generation"]

#: Builds and submits the job, given where its events go.
Starter = Callable[[Callable[[Event], None]], Job]


class _Outcome:
    """The shared end of both iterators: the result, or the error, once known."""

    def __init__(self) -> None:
        self.result: Result | None = None
        self.finished = False

    def take(self, event: Event) -> str | None:
        """Text to yield, ``None`` at the end; raises the job's error."""
        kind, value = event
        if kind == "text":
            assert isinstance(value, str)
            return value
        self.finished = True
        if kind == "done":
            assert isinstance(value, Result)
            self.result = value
            return None
        assert isinstance(value, BaseException)
        raise value


class Generation(Iterator[str]):
    """Text chunks of one reply as they are generated; ``result()`` waits for the whole.

    Stop early with :meth:`close` (or a ``with`` block, or by dropping the object): the engine
    stops this sequence within one step and the sequence stays consistent for the next prompt.
    """

    def __init__(self, start: Starter) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._outcome = _Outcome()
        self._job = start(self._events.put)

    def __next__(self) -> str:
        while not self._outcome.finished:
            try:
                event = self._events.get()
            except BaseException:  # KeyboardInterrupt while waiting: stop the reply too
                self._job.cancel()
                raise
            if (text := self._outcome.take(event)) is not None:
                return text
        raise StopIteration

    def result(self) -> Result:
        """Wait for the end of the reply and return it (raises the generation's error)."""
        for _ in self:
            pass
        assert self._outcome.result is not None
        return self._outcome.result

    def close(self) -> None:
        """Cancel the generation and wait until the engine has stopped it.

        Its :meth:`result` stays available (``finish_reason == "cancelled"``).
        """
        if not self._outcome.finished:
            self._job.cancel()
            with contextlib.suppress(SeqleaseError):
                for _ in self:  # up to the engine's "done": the rest of the text is dropped
                    pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Non-blocking: a dropped iterator must not keep the engine busy.
        if (job := getattr(self, "_job", None)) is not None:
            job.cancel()


class AsyncGeneration(AsyncIterator[str]):
    """The asyncio form of :class:`Generation`; cancelling the reading task cancels the reply."""

    def __init__(self, start: Starter) -> None:
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._outcome = _Outcome()

        def emit(event: Event) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody reads any more
                job.cancel()

        job = start(emit)
        self._job = job

    async def __anext__(self) -> str:
        while not self._outcome.finished:
            try:
                event = await self._events.get()
            except BaseException:  # the reading task was cancelled: stop the reply too
                self._job.cancel()
                raise
            if (text := self._outcome.take(event)) is not None:
                return text
        raise StopAsyncIteration

    async def result(self) -> Result:
        """Wait for the end of the reply and return it."""
        async for _ in self:
            pass
        assert self._outcome.result is not None
        return self._outcome.result

    async def aclose(self) -> None:
        """Cancel the generation and wait (without blocking the loop) until it has stopped."""
        if not self._outcome.finished:
            self._job.cancel()
            with contextlib.suppress(SeqleaseError):
                async for _ in self:
                    pass

    def __del__(self) -> None:
        if (job := getattr(self, "_job", None)) is not None:
            job.cancel()
