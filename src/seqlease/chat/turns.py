"""One turn at a time on a chat session, and never a wait that cannot end."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from seqlease.errors import SessionBusyError
from seqlease.loop_bridge import wake_from_thread

__all__ = ["TurnGuard"]


class TurnGuard:
    """Serializes the turns of one session across threads and tasks.

    A whole-reply call (``prompt``/``aprompt``) from another thread or task waits for the turn
    in progress: that wait ends with the reply. Waiting cannot end when the turn belongs to the
    caller itself, or to an open stream (its reader may never come back), so those raise
    :class:`SessionBusyError` at once instead of deadlocking.
    """

    def __init__(self) -> None:
        """No turn in progress."""
        self._lock = threading.Lock()
        self._owner: object | None = None
        self._streaming = False
        self._waiters: deque[Callable[[], object]] = deque()

    # turn() and aturn() differ only in how they wait to be woken: a thread blocks on an
    # Event, a task awaits a future resolved in its loop. Taking, queueing and giving back
    # the turn is one code (_take, _held).

    @contextlib.contextmanager
    def turn(self, *, streaming: bool) -> Iterator[None]:
        """Hold the turn in this thread for the ``with`` block."""
        me = threading.current_thread()
        while True:
            woken = threading.Event()
            if self._take(me, streaming, woken.set):
                break
            woken.wait()
        with self._held():
            yield

    @contextlib.asynccontextmanager
    async def aturn(self, *, streaming: bool) -> AsyncIterator[None]:
        """Hold the turn in this task for the ``async with`` block."""
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while True:
            woken: asyncio.Future[None] = loop.create_future()
            if self._take(me, streaming, functools.partial(wake_from_thread, loop, woken)):
                break
            await woken
        with self._held():
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the turn for the ``with`` block if it is free; never waits.

        For work between turns (saving the session): waiting here could block an event loop
        whose own task holds the turn.
        """
        with self._lock:
            if self._owner is not None:
                raise SessionBusyError(
                    "a turn of this chat session is in progress: wait for its reply (or close "
                    "its stream) first"
                )
            self._owner = self
        with self._held():
            yield

    def _take(self, me: object, streaming: bool, wake: Callable[[], object]) -> bool:
        """Take the turn for ``me`` if free; else queue ``wake`` (called once it is let go).

        Raises where waiting could not end: the turn is ``me``'s own, or an open stream's.
        """
        with self._lock:
            if self._owner is None:
                self._owner, self._streaming = me, streaming
                return True
            if self._owner is me or self._streaming:
                raise SessionBusyError(
                    "a reply stream of this chat session is still open: read it to the end or "
                    "close() it before starting the next turn"
                    if self._streaming
                    else "this thread or task is already in a turn of this chat session"
                )
            self._waiters.append(wake)
            return False

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """The turn, taken, for the ``with`` block; then let go and every waiter woken."""
        try:
            yield
        finally:
            with self._lock:
                self._owner, self._streaming = None, False
                waiters = list(self._waiters)
                self._waiters.clear()
            for wake in waiters:  # all of them compete again; one wins, the others queue again
                wake()
