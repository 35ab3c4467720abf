"""Work that stops when the client hangs up, and server-sent events that own their lease.

Uvicorn tells an app that its client went away only through ``receive()``, which returns
``http.disconnect``. A request that waits for a sequence, or for a whole reply, would
otherwise keep its place and its sequence until the reply was done for nobody. Here the work
runs beside a watcher of ``receive()``; a hang-up cancels the work, which stops the
generation within one step and gives the sequence back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = ["ClientGone", "EventStream", "until_disconnected"]

T = TypeVar("T")

logger = logging.getLogger("seqlease.server")


class ClientGone(Exception):
    """The client hung up before the work was done (the work was cancelled)."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # the rest of a body already read: keep listening


async def until_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """``await work()``, cancelled if the client hangs up first (then :class:`ClientGone`)."""
    done: list[T] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _disconnected(receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            done.append(await work())
        except Exception as exc:  # raised as itself below, not in an exception group
            failed.append(exc)
        group.cancel_scope.cancel()  # stops the watcher
    if failed:
        raise failed[0]
    if not done:
        raise ClientGone
    return done[0]


class EventStream(StreamingResponse):
    """``text/event-stream``: each event as ``data: {json}``, then ``data: [DONE]``.

    The response owns what the events need (a lease): ``cleanup`` runs when the stream ends,
    fails, or the client hangs up, shielded from cancellation so that it always completes.
    """

    media_type = "text/event-stream"

    def __init__(
        self, events: AsyncIterator[dict[str, Any]], cleanup: Callable[[], Awaitable[None]]
    ) -> None:
        """Stream ``events``; ``cleanup`` once the response is over, however it ends."""
        # No caching, and no buffering by proxies such as nginx: events go out as made.
        super().__init__(
            _encoded(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the events until they end or the client hangs up; then clean up."""
        # Starlette's own __call__ watches for a hang-up only below ASGI 2.4; elsewhere it
        # would notice one at the next send, and a reply would run on for nobody meanwhile.
        try:
            await until_disconnected(receive, lambda: self.stream_response(send))
        except (ClientGone, OSError):
            logger.info("client hung up during a stream; its generation was stopped")
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


async def _encoded(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The events as server-sent event lines, ending in ``[DONE]`` as OpenAI's do."""
    async for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
    yield b"data: [DONE]\n\n"
