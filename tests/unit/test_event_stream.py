"""The server's ``EventStream`` driven as an ASGI app: headers, events, hang-ups, clean-up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from seqlease.server.streaming import EventStream

pytestmark = pytest.mark.timeout(30)

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}


class Recorder:
    """What a test needs to see of a response: what it sent, whether it cleaned up."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.cleanups = 0
        self.first_sent = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            self.first_sent.set()

    async def cleanup(self) -> None:
        await asyncio.sleep(0)  # an await: only a shielded clean-up completes when cancelled
        self.cleanups += 1

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _events(n: int, *, stalled: asyncio.Event | None = None) -> AsyncIterator[dict]:
    for i in range(n):
        yield {"i": i, "text": "é"}
    if stalled is not None:
        await stalled.wait()  # a reply that is slow to give its next token


def test_the_headers_say_event_stream_with_no_length_and_no_buffering():
    recorder = Recorder()
    response = EventStream(_events(0), recorder.cleanup)
    assert response.media_type == "text/event-stream"
    assert "content-length" not in response.headers
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"


def test_events_are_data_lines_then_done_and_the_cleanup_runs_once():
    recorder = Recorder()
    asyncio.run(EventStream(_events(2), recorder.cleanup)(SCOPE, _never_disconnects, recorder.send))
    start = recorder.sent[0]
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    assert b"content-length" not in dict(start["headers"])
    events = recorder.body().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert [json.loads(e.removeprefix("data: ")) for e in events[:-2]] == [
        {"i": 0, "text": "é"},
        {"i": 1, "text": "é"},
    ]
    assert recorder.sent[-1].get("more_body", False) is False
    assert recorder.cleanups == 1


def test_a_hang_up_while_the_events_stall_stops_them_and_cleans_up():
    recorder = Recorder()
    stalled = asyncio.Event()  # never set: only the hang-up can end this stream

    async def hang_up() -> dict[str, Any]:
        await recorder.first_sent.wait()
        return {"type": "http.disconnect"}

    response = EventStream(_events(1, stalled=stalled), recorder.cleanup)
    asyncio.run(asyncio.wait_for(response(SCOPE, hang_up, recorder.send), 10))
    assert b"[DONE]" not in recorder.body()
    assert recorder.cleanups == 1


def test_a_send_that_fails_because_the_client_left_still_cleans_up():
    recorder = Recorder()

    async def gone(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    asyncio.run(EventStream(_events(3), recorder.cleanup)(SCOPE, _never_disconnects, gone))
    assert recorder.cleanups == 1


def test_the_cleanup_completes_when_the_response_is_cancelled():
    recorder = Recorder()

    async def main() -> None:
        stalled = asyncio.Event()
        response = EventStream(_events(1, stalled=stalled), recorder.cleanup)
        task = asyncio.create_task(response(SCOPE, _never_disconnects, recorder.send))
        await recorder.first_sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert recorder.cleanups == 1


def test_a_failing_event_source_raises_after_cleaning_up():
    recorder = Recorder()

    async def failing() -> AsyncIterator[dict]:
        yield {"i": 0}
        raise RuntimeError("the events broke")

    with pytest.raises(RuntimeError, match="broke"):
        asyncio.run(
            EventStream(failing(), recorder.cleanup)(SCOPE, _never_disconnects, recorder.send)
        )
    assert recorder.cleanups == 1
