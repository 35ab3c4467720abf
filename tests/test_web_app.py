"""``examples/web_app.py`` served by a real uvicorn over TCP, on the real default model.

The server runs in a child process, as users run it (``python -m uvicorn
examples.web_app:app``), with a pool of 2 sequences and one llama.cpp thread. Its counters,
read over HTTP from ``/stats``, prove that no request kept a sequence.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SEQUENCES = 2
STARTUP_TIMEOUT = 90.0
SHUTDOWN_TIMEOUT = 30.0
#: Greedy decoding of this prompt runs far past the first chunk: a stream to hang up on.
LONG_PROMPT = "Write the numbers from 1 to 300 separated by commas."


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT, as Ctrl-C: uvicorn shuts down gracefully and runs the lifespan's exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path_factory.mktemp("web_app") / "server.log"
    env = {
        **os.environ,
        "SEQLEASE_SEQUENCES": str(SEQUENCES),
        "SEQLEASE_THREADS": "1",
        "SEQLEASE_N_CTX": "1024",
        "GGML_NO_BACKTRACE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.web_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{srv.output()}")
            try:
                if httpx.get(f"{srv.url}/stats", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in {STARTUP_TIMEOUT} s:\n{srv.output()}")
            time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            _stop(proc)


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Answer:
    endpoint: str
    status: int
    text: str = ""
    retry_after: str | None = None
    body: dict | None = None
    events: list[tuple[str, dict]] | None = None


async def _events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """Parse server-sent events: (event name, JSON data)."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())


async def _random(client: httpx.AsyncClient, i: int) -> Answer:
    r = await client.post("/random", json={"max_tokens": 8, "seed": i})
    answer = Answer("/random", r.status_code, retry_after=r.headers.get("retry-after"))
    answer.body = r.json()
    if r.status_code == 200:
        answer.text = answer.body["text"]
    return answer


async def _chat(client: httpx.AsyncClient, i: int) -> Answer:
    body = {"message": f"Give me one fact about the number {i}.", "max_tokens": 8, "seed": i}
    async with client.stream("POST", "/chat", json=body) as r:
        answer = Answer("/chat", r.status_code, retry_after=r.headers.get("retry-after"))
        if r.status_code != 200:
            await r.aread()
            answer.body = r.json()
            return answer
        assert r.headers["content-type"].startswith("text/event-stream")
        answer.events = [e async for e in _events(r)]
    answer.text = "".join(d["text"] for name, d in answer.events if name == "message")
    return answer


def _stats(client: httpx.Client | None, url: str) -> dict:
    r = (client or httpx).get(f"{url}/stats", timeout=10)
    assert r.status_code == 200
    return r.json()


def _settled(url: str, timeout: float = 5.0) -> dict:
    """Stats once no sequence is leased or being cleared."""
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            stats = _stats(client, url)
            if (stats["leased"] == 0 and stats["quarantined"] == 0) or (
                time.monotonic() > deadline
            ):
                return stats
            time.sleep(0.01)


# -- tests ----------------------------------------------------------------------------------


def test_stats_shows_an_idle_pool(server):
    stats = _stats(None, server.url)
    assert stats["size"] == SEQUENCES
    assert stats["free"] == SEQUENCES
    assert stats["leased"] == 0
    assert stats["holders"] == []


@pytest.mark.parametrize(
    ("endpoint", "body", "complaint"),
    [
        ("/chat", {"message": ""}, "whitespace"),
        ("/chat", {"message": "  \n\t "}, "whitespace"),
        ("/chat", {}, "message"),
        ("/chat", {"message": "hi", "max_tokens": 0}, "max_tokens"),
        ("/chat", {"message": "hi", "temperature": -1}, "temperature"),
        ("/chat", {"message": "hi", "top_q": 1}, "top_q"),
        ("/random", {"max_tokens": 100_000}, "max_tokens"),
        ("/random", {"topic": " "}, "whitespace"),
    ],
)
def test_bad_requests_are_422_before_any_lease(server, endpoint, body, complaint):
    before = _stats(None, server.url)
    r = httpx.post(f"{server.url}{endpoint}", json=body, timeout=10)
    assert r.status_code == 422
    assert complaint in json.dumps(r.json()["detail"])
    after = _stats(None, server.url)
    assert after["acquires"] == before["acquires"]


def test_concurrent_requests_are_answered_or_busy_and_nothing_leaks(server):
    n = 20
    before = _settled(server.url)

    async def burst() -> list[Answer]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            calls = [(_random if i % 2 else _chat)(client, i) for i in range(n)]
            return await asyncio.gather(*calls)

    started = time.monotonic()
    answers = asyncio.run(burst())
    elapsed = time.monotonic() - started
    after = _settled(server.url)

    ok = [a for a in answers if a.status == 200]
    busy = [a for a in answers if a.status == 503]
    print(
        f"\n{n} concurrent requests in {elapsed:.2f} s: {len(ok)} x 200 "
        f"({sum(a.endpoint == '/chat' for a in ok)} streamed), {len(busy)} x 503"
    )
    assert [a for a in answers if a.status not in (200, 503)] == []
    # With 20 requests at once on 2 sequences and timeout=0, both outcomes must occur, or this
    # test proves nothing about busy handling.
    assert ok
    assert busy
    # /chat leases before its response starts: a full pool is a 503 there too, not a 200
    # stream that fails (each endpoint got 10 of the 20 requests, and only 2 can run).
    assert {a.endpoint for a in busy} == {"/random", "/chat"}
    for a in busy:
        assert a.retry_after is not None
        assert a.retry_after.isdigit()
        assert int(a.retry_after) >= 1
        assert a.body is not None
        assert a.body["error"] == "busy"
    for a in ok:
        assert a.text.strip(), a
        if a.endpoint == "/chat":
            assert a.events is not None
            names = [name for name, _ in a.events]
            assert names[-1] == "done", a.events
            assert "error" not in names
            done = a.events[-1][1]
            assert done["finish_reason"] in ("eog", "stop", "length")
            assert 0 <= done["sequence"] < SEQUENCES
        else:
            assert 0 <= a.body["sequence"] < SEQUENCES

    # Every sequence came back, cleared, and none was reclaimed from a dropped handle.
    assert after["leased"] == 0
    assert after["free"] == SEQUENCES
    assert after["leaked"] == 0
    assert after["holders"] == []
    assert after["acquires"] - before["acquires"] == len(ok)
    assert after["releases"] - before["releases"] == len(ok)
    assert after["timeouts"] - before["timeouts"] == len(busy)


def test_client_disconnect_mid_stream_frees_the_sequence_within_a_second(server):
    before = _settled(server.url)

    async def hang_up() -> tuple[dict, float, dict]:
        body = {"message": LONG_PROMPT, "max_tokens": 900, "temperature": 0}
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as admin,
            httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        ):
            async with client.stream("POST", "/chat", json=body) as r:
                assert r.status_code == 200
                events = _events(r)
                name, data = await anext(events)
                assert name == "message"
                assert "text" in data
                during = (await admin.get("/stats")).json()
                await events.aclose()
            # Leaving the block closed the response before its end: httpx drops the connection.
            hung_up = time.monotonic()
            deadline = hung_up + 1.0
            while True:
                stats = (await admin.get("/stats")).json()
                if stats["free"] == SEQUENCES and stats["leased"] == 0:
                    return during, time.monotonic() - hung_up, stats
                if time.monotonic() > deadline:
                    pytest.fail(f"the sequence was not freed within 1 s of the disconnect: {stats}")
                await asyncio.sleep(0.005)

    during, freed_after, after = asyncio.run(hang_up())
    print(f"\ndisconnect to free sequence: {freed_after * 1000:.0f} ms")
    # The stream held its sequence while it was being read (so it was cut, not finished).
    assert during["leased"] == 1
    assert len(during["holders"]) == 1
    assert freed_after < 1.0
    assert after["leaked"] == 0
    assert after["acquires"] - before["acquires"] == 1
    assert after["releases"] - before["releases"] == 1

    # The sequence serves the next request as if nothing had happened.
    r = httpx.post(f"{server.url}/random", json={"max_tokens": 8}, timeout=30)
    assert r.status_code == 200
    assert r.json()["text"].strip()


def test_server_shuts_down_cleanly(server):
    assert _settled(server.url)["leased"] == 0
    assert _stop(server.proc) == 0
    output = server.output()
    assert "Application shutdown complete" in output, output
    assert "Traceback" not in output, output
    assert "LeaseLeakWarning" not in output, output
