"""The lock around every native call of a backend, handed to waiters in arrival order."""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType

__all__ = ["Guard"]


class Guard:
    """A reentrant lock that a release hands straight to the longest-waiting thread.

    The worker thread takes its guard again microseconds after letting go of it, and with
    ``threading.RLock`` it won every time: releasing a lease (which clears its sequence under
    the guard) waited 2 s, until the other sequence's 300-token reply had ended. Here a thread
    that asks while another holds the guard is next, whoever asks after it.
    """

    def __init__(self) -> None:
        """An unlocked guard."""
        self._mutex = threading.Lock()  # protects the fields below, held for microseconds
        self._owner: int | None = None
        self._depth = 0
        self._queue: deque[tuple[int, threading.Lock]] = deque()

    @property
    def waiting(self) -> int:
        """Threads queued for the guard now, in arrival order."""
        with self._mutex:
            return len(self._queue)

    def acquire(self) -> None:
        """Wait for the guard (at once where this thread already holds it)."""
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._queue.append((me, turn))
        try:
            turn.acquire()  # released by the holder's last release, which made us the owner
        except BaseException:  # Ctrl-C while waiting: leave the queue, or pass the guard on
            with self._mutex:
                handed = (me, turn) not in self._queue
                if not handed:
                    self._queue.remove((me, turn))
            if handed:
                self.release()
            raise

    def release(self) -> None:
        """Let go once; the last release hands the guard to the first thread waiting.

        Raises:
            RuntimeError: this thread does not hold the guard.

        """
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("the guard is released by a thread that does not hold it")
            self._depth -= 1
            if self._depth:
                return
            if not self._queue:
                self._owner = None
                return
            self._owner, turn = self._queue.popleft()
            self._depth = 1
        turn.release()

    def __enter__(self) -> Guard:
        """Acquire the guard."""
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the guard."""
        self.release()
