"""Stream lifecycles: every way a caller stops reading ends the reply, and nothing hangs.

Each test runs under a short timeout: a hang fails it instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest

import seqlease
from helpers import settle

pytestmark = pytest.mark.timeout(60)

LONG = "Count slowly: one, two,"  # greedy: runs to max_tokens
GREEDY_LONG = {"temperature": 0, "max_tokens": 200}
# About 400 tokens: evaluating them takes over a second on one thread, before any chunk.
WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "window", "garden", "silver"]
SLOW_PROMPT = " ".join(random.Random(7).choice(WORDS) for _ in range(400))


@pytest.fixture(scope="module", params=["session", "completion"])
def ctx(request: pytest.FixtureRequest) -> Iterator[seqlease.Context]:
    with seqlease.Context(sequences=2, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


@pytest.fixture(autouse=True)
def _pool_is_clean_after(ctx: seqlease.Context) -> Iterator[None]:
    yield
    stats = settle(ctx)
    assert (stats.leased, stats.free) == (0, 2)


def test_close_from_another_thread_stops_the_reply_while_one_thread_reads(ctx):
    with ctx.lease() as seq:
        gen = seq.generate(LONG, **GREEDY_LONG)
        first = threading.Event()
        read: list[str] = []

        def reader() -> None:
            for chunk in gen:
                read.append(chunk)
                first.set()

        thread = threading.Thread(target=reader)
        thread.start()
        assert first.wait(10)
        start = time.monotonic()
        gen.close()  # from this thread, while the reader is blocked in next()
        closed_in = time.monotonic() - start
        thread.join(5)
        assert not thread.is_alive(), "the reader did not see the end"
        assert closed_in < 1.0
        assert gen.result().finish_reason == "cancelled"
        assert gen.result().n_generated < 200


def test_a_second_reader_gets_a_clear_error_and_both_see_the_end(ctx):
    with ctx.lease() as seq:
        gen = seq.generate(LONG, temperature=0, max_tokens=40)
        reading = threading.Event()
        outcome: list[object] = []

        def first_reader() -> None:
            for _ in gen:
                reading.set()
            outcome.append("end")

        thread = threading.Thread(target=first_reader)
        thread.start()
        assert reading.wait(10)
        # The first reader is (almost always) inside next(); keep trying until we collide.
        with pytest.raises(seqlease.StreamInUseError, match="one thread or task"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not gen.finished:
                next(gen)
            raise seqlease.StreamInUseError("never collided: read from one thread or task")
        thread.join(10)
        assert outcome == ["end"]
        assert list(gen) == []  # after the end, any reader just stops
        assert gen.result().n_generated >= 1


def test_ctrl_c_while_waiting_for_a_chunk_stops_the_reply(ctx):
    # Python turns SIGINT into KeyboardInterrupt only when it was not ignored at start-up.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        with ctx.lease() as seq:
            gen = seq.generate(SLOW_PROMPT, **GREEDY_LONG)
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                next(gen)  # blocked: the prompt is still being evaluated
            result = gen.result()
            assert result.finish_reason == "cancelled"
            assert result.n_generated < 200
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)


def test_a_reader_and_threads_waiting_for_the_result_all_see_the_end(ctx):
    with ctx.lease() as seq:
        gen = seq.generate(LONG, temperature=0, max_tokens=40)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            waiters = [pool.submit(gen.result) for _ in range(3)]
            text = "".join(gen)
            results = [w.result(timeout=30) for w in waiters]
        assert {r.text for r in results} == {text}
        assert results[0].n_generated == 40


def test_async_with_an_async_generation_stops_it_on_the_way_out(ctx):
    async def main() -> seqlease.Result:
        async with ctx.alease() as seq:
            async with seq.agenerate(LONG, **GREEDY_LONG) as gen:
                await anext(gen)
            result = await gen.result()
            # The sequence is free for the next generation at once.
            assert (await seq.agenerate("The ocean is", max_tokens=2).result()).n_generated
            return result

    result = asyncio.run(main())
    assert result.finish_reason == "cancelled"
    assert result.n_generated < 200


def test_break_out_of_a_loop_then_generate_at_once(ctx):
    with ctx.lease() as seq:
        for _ in seq.generate(LONG, **GREEDY_LONG):
            break
        again = seq.generate("The ocean is", temperature=0, max_tokens=4).result()
        assert again.n_generated >= 1


def test_a_dropped_generation_is_stopped(ctx):
    with ctx.lease() as seq:
        gen = seq.generate(LONG, **GREEDY_LONG)
        next(gen)
        del gen
        assert seq.generate("The ocean is", temperature=0, max_tokens=4).result().n_generated


def test_a_running_generation_still_makes_the_sequence_busy(ctx):
    with ctx.lease() as seq:
        gen = seq.generate(LONG, **GREEDY_LONG)
        next(gen)
        with pytest.raises(seqlease.SequenceBusyError, match="close"):
            seq.generate("Hello")
        gen.close()


def test_break_out_of_async_for_then_agenerate_at_once(ctx):
    async def main() -> float:
        async with ctx.alease() as seq:
            async for _ in seq.agenerate(LONG, **GREEDY_LONG):
                break
            start = time.monotonic()
            async for _ in seq.agenerate("The ocean is", temperature=0, max_tokens=4):
                pass
            return time.monotonic() - start

    assert asyncio.run(main()) < 2.0


def test_a_new_chat_turn_while_a_stream_is_open_raises_instead_of_deadlocking(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        stream = chat.stream("Count to twenty.", **GREEDY_LONG)
        next(stream)
        with pytest.raises(seqlease.SessionBusyError, match="close"):
            chat.prompt("Hi")
        stream.close()
        assert chat.prompt("Hi", max_tokens=4) is not None
        assert [m["role"] for m in chat.history] == ["user", "assistant"]


def test_a_new_async_chat_turn_while_a_stream_is_open_raises(ctx):
    async def main() -> None:
        async with ctx.alease() as seq:
            chat = seqlease.ChatSession(seq)
            stream = chat.astream("Count to twenty.", **GREEDY_LONG)
            await anext(stream)
            with pytest.raises(seqlease.SessionBusyError):
                await chat.aprompt("Hi")
            await stream.aclose()
            await chat.aprompt("Hi", max_tokens=4)

    asyncio.run(main())


def test_alease_releases_when_cancelled_while_exiting_with_the_executor_busy(ctx):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        blocker = threading.Event()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(executor)
        loop.run_in_executor(None, blocker.wait, 30)  # the default executor is now busy
        exiting = asyncio.Event()

        async def hold() -> None:
            async with ctx.alease() as seq:
                gen = seq.generate(LONG, **GREEDY_LONG)  # release must wait for the engine
                next(gen)
                exiting.set()
            # the task is cancelled during __aexit__

        task = asyncio.create_task(hold())
        await exiting.wait()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while ctx.stats().leased and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert ctx.stats().leased == 0, "the release never ran"
        blocker.set()
        executor.shutdown(wait=False)

    asyncio.run(main())


def test_a_session_after_its_lease_is_both_released_and_missing(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
    with pytest.raises(seqlease.SequenceReleasedError) as info:
        chat.prompt("Hi")
    assert isinstance(info.value, seqlease.MissingSequenceError)
    assert isinstance(info.value, seqlease.SessionReleasedError)
    with pytest.raises(seqlease.MissingSequenceError):
        seqlease.ChatSession(seq)


def test_lease_classes_are_exported(ctx):
    assert isinstance(ctx.lease(), seqlease.Lease)
    assert isinstance(ctx.alease(), seqlease.AsyncLease)
