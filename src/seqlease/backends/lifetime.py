"""When a backend may free its native memory: once, and only after its worker thread stopped."""

from __future__ import annotations

import threading
from collections.abc import Callable

from seqlease.backends.guard import Guard

__all__ = ["NativeLifetime"]


class NativeLifetime:
    """Frees native memory exactly once, never while the thread that uses it still runs.

    The worker thread calls :meth:`thread_exited` as the last thing it does. :meth:`free_after`
    joins that thread first; called on the thread itself (a finalizer that ran during garbage
    collection there), it cannot join, so the memory is freed as the thread exits instead.
    """

    def __init__(self, guard: Guard, free: Callable[[], None]) -> None:
        """``free`` releases the memory; it runs under ``guard``, which every user holds."""
        self._guard = guard
        self._free = free
        self._free_on_exit = False
        self.freed = False

    def free_after(self, thread: threading.Thread) -> None:
        """Free once ``thread`` (already told to stop) has ended."""
        if threading.current_thread() is thread:
            self._free_on_exit = True
        else:
            thread.join()
            self.free()

    def thread_exited(self) -> None:
        """Called by the worker thread on its way out."""
        if self._free_on_exit:
            self.free()

    def free(self) -> None:
        """Free now (idempotent); callers make sure no thread is still using the memory."""
        with self._guard:
            if self.freed:
                return
            self.freed = True
            self._free()
