"""Work that stops when the client hangs up, and server-sent events that own their lease.

Uvicorn tells an app that its client went away only through ``receive()``, which returns
``http.disconnect``. A request that waits for a sequence, or for a whole reply, would
otherwise keep its place and its sequence until the reply was done for nobody. Here the work
runs beside a watcher of ``receive()``; a hang-up cancels the work, which stops the
generation within one step and gives the sequence back.

A client may also half-close its socket once its request is sent and still read the reply;
:class:`HalfCloseH11Protocol` keeps uvicorn from taking that for a hang-up.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import h11
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ClientGone", "EventStream", "HalfCloseH11Protocol", "until_disconnected"]

T = TypeVar("T")

logger = logging.getLogger("seqlease.server")

# How often a half-closed connection's socket is asked whether the client reset it, and
# how many of those checks go by between two probes of a reply not yet begun.
_RESET_CHECK_INTERVAL = 0.1
_CHECKS_PER_PROBE = 10


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


class HalfCloseH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, answering a client that half-closed after its request.

    Uvicorn takes any EOF for a hang-up and closes the transport, so a client that has only
    shut down its sending side (``shutdown(SHUT_WR)``) never gets its response (uvicorn
    issue #1264). A close and a half-close both arrive as that EOF, and only a write tells
    them apart: a closed socket answers bytes with a reset. So after a complete HTTP/1.1
    request an EOF leaves the transport open; until the response starts, an interim ``100
    Continue`` (which HTTP/1.1 clients must accept, RFC 9110 15.2) goes out every second,
    and after, the stream's own chunks draw the reset. Once the socket reports it, the
    connection is dropped and the app hears ``http.disconnect`` as before.
    """

    # asyncio's signature: True keeps the transport open (uvicorn declares None).
    def eof_received(self) -> bool:  # type: ignore[override]
        """Keep answering a finished request; any other EOF is a hang-up, as in uvicorn."""
        cycle = self.cycle
        sock = self.transport.get_extra_info("socket")
        if (
            cycle is None
            or cycle.response_complete
            or self.conn.their_state is not h11.DONE
            or self.conn.their_http_version != b"1.1"  # no 1xx may go to HTTP/1.0
            or sock is None
        ):
            super().eof_received()
            return False  # asyncio closes the transport; uvicorn tells the app
        cycle.keep_alive = False  # no request can follow: close once answered
        self._check_reset(sock, 0)
        return True

    def _check_reset(self, sock: Any, checks: int) -> None:
        if self.transport.is_closing():
            return  # answered and closed, or lost
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.transport.abort()  # the client is gone: connection_lost disconnects the app
            return
        if not self.cycle.response_started and checks % _CHECKS_PER_PROBE == 0:
            probe = h11.InformationalResponse(status_code=100, headers=[], reason="Continue")
            self.transport.write(self.conn.send(probe))
        self.loop.call_later(_RESET_CHECK_INTERVAL, self._check_reset, sock, checks + 1)
