"""Waking an asyncio future from another thread: the one way seqlease does it."""

from __future__ import annotations

import asyncio

__all__ = ["wake_from_thread"]


def wake_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> bool:
    """Resolve ``future`` in ``loop`` from any thread; ``False`` when the loop is closed."""
    try:
        loop.call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # the loop is closed: nobody is awaiting any more
        return False
    return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter's future is done already
        future.set_result(None)
