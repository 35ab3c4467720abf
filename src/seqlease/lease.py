"""``with ctx.lease() as seq:`` and ``async with ctx.alease() as seq:``: a lease for a block."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from seqlease.loop_bridge import wake_from_thread

if TYPE_CHECKING:
    from seqlease.context import Context
    from seqlease.sequence import Sequence

__all__ = ["AsyncLease", "Lease", "release_off_loop"]


class Lease:
    """``with ctx.lease() as seq:`` -- acquires on entry, always releases on exit.

    A class rather than a generator-based context manager: it is on every request's path, and
    this is half the cost.
    """

    __slots__ = ("_context", "_seq", "_timeout")

    def __init__(self, context: Context, timeout: float | None) -> None:
        self._context = context
        self._timeout = timeout
        self._seq: Sequence | None = None

    def __enter__(self) -> Sequence:
        self._seq = self._context.acquire(self._timeout)
        return self._seq

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._seq is not None:
            self._seq.release()


class AsyncLease:
    """``async with ctx.alease() as seq:`` -- the asyncio form of :class:`Lease`."""

    __slots__ = ("_context", "_seq", "_timeout")

    def __init__(self, context: Context, timeout: float | None) -> None:
        self._context = context
        self._timeout = timeout
        self._seq: Sequence | None = None

    async def __aenter__(self) -> Sequence:
        self._seq = await self._context.aacquire(self._timeout)
        return self._seq

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._seq is not None:
            await release_off_loop(self._seq)


async def release_off_loop(seq: Sequence) -> None:
    """Release ``seq`` without blocking the event loop; it completes even if we are cancelled.

    Releasing may wait for the engine to finish a step, so it runs on a thread of its own:
    not the loop's default executor, where queued work is dropped when the awaiting task is
    cancelled, and which may be busy with the application's own blocking calls.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def release() -> None:
        try:
            seq.release()
        finally:
            wake_from_thread(loop, done)

    # Not a daemon: an exiting interpreter finishes the release (one engine step at most).
    threading.Thread(target=release, name=f"seqlease-release-{seq.id}").start()
    await asyncio.shield(done)
