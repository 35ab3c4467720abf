"""``with ctx.lease() as seq:`` and ``async with ctx.alease() as seq:``: a lease for a block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

from seqlease.sequence import Sequence

__all__ = ["AsyncLease", "Lease"]


class Lease:
    """``with ctx.lease() as seq:`` -- acquires on entry, always releases on exit.

    A class rather than a generator-based context manager: it is on every request's path, and
    this is half the cost.
    """

    __slots__ = ("_acquire", "_seq", "_timeout")

    def __init__(self, acquire: Callable[[float | None], Sequence], timeout: float | None) -> None:
        self._acquire = acquire
        self._timeout = timeout
        self._seq: Sequence | None = None

    def __enter__(self) -> Sequence:
        self._seq = self._acquire(self._timeout)
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

    __slots__ = ("_acquire", "_seq", "_timeout")

    def __init__(
        self, acquire: Callable[[float | None], Awaitable[Sequence]], timeout: float | None
    ) -> None:
        self._acquire = acquire
        self._timeout = timeout
        self._seq: Sequence | None = None

    async def __aenter__(self) -> Sequence:
        self._seq = await self._acquire(self._timeout)
        return self._seq

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._seq is not None:
            await self._seq.arelease()
