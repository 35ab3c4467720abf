"""The batching engine on the real default model: equivalence, cancellation, limits, text."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import operator
import threading

import pytest

import seqlease
from helpers import held_tokens, native_pos_max, never_end, wait_for
from seqlease.request.text import TextAssembler

by_id = operator.attrgetter("id")

PROMPTS = [
    "Once upon a time",
    "The weather today is",
    "Python is a programming language that",
    "My favourite food is",
    "The capital of France is",
    "In the year 2050, cars will",
    "A good way to learn maths is",
    "The ocean is",
]


@pytest.fixture(scope="module")
def ctx():
    # One llama.cpp thread: with OpenMP, two threads on a busy 2-core box stall for 100s of ms.
    with seqlease.Context(sequences=8, n_ctx=256, n_threads=1) as ctx:
        yield ctx


def _serial(ctx: seqlease.Context, prompts: list[str], **kw) -> list[seqlease.Result]:
    out = []
    for prompt in prompts:
        with ctx.lease() as seq:
            out.append(seq.generate(prompt, **kw).result())
    return out


def _concurrent(ctx: seqlease.Context, prompts: list[str], **kw):
    results: list[object] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        with ctx.lease(timeout=30) as seq:
            barrier.wait()
            results[i] = seq.generate(prompts[i], **kw).result()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_eight_concurrent_greedy_generations_match_serial(ctx):
    serial = _serial(ctx, PROMPTS, temperature=0, max_tokens=24, logprobs=True)
    steps_before = ctx.probe.steps
    batched = _concurrent(ctx, PROMPTS, temperature=0, max_tokens=24, logprobs=True)
    steps = ctx.probe.steps - steps_before
    generated = sum(r.n_generated for r in batched)
    # With one KV stream per sequence, batching changes no bit (docs/concepts/prefixes.md,
    # "Same reply, copied or not").
    assert [r.logprobs for r in batched] == [r.logprobs for r in serial]
    assert [r.text for r in batched] == [r.text for r in serial]
    # They really shared steps: far fewer steps than tokens.
    assert steps < generated / 3, (steps, generated)


def test_a_neighbours_prompt_changes_no_bit_of_a_reply() -> None:
    """Prompts of 3 and 4 tokens on consecutive sequences start in one step, beside a decoder.

    llama.cpp evaluates such a batch in micro-batches of as many tokens per sequence as the
    shortest has, so the 4-token prompt would be cut 1 + 2 + 1, and its lone last token
    rounds differently: its log-probabilities moved by up to 0.42 and its greedy reply
    changed (" was in the car" alone, " woke up" beside the neighbour).
    """
    prompt, neighbour = "In the morning I", "The ocean is"
    greedy = {"temperature": 0, "max_tokens": 8, "logprobs": True}

    def bits(result: seqlease.Result) -> list[tuple[int, float]]:
        return [(p.token, p.logprob) for p in result.logprobs]

    # No prefix cache: every lease starts empty and evaluates its whole prompt.
    with seqlease.Context(sequences=3, n_ctx=128, n_threads=1, prefix_cache=False) as ctx:
        alone = {}
        for text in (prompt, neighbour):
            with ctx.lease() as seq:
                alone[text] = bits(seq.generate(text, **greedy).result())
        probe = ctx.probe
        calls: list[tuple[int, dict[int, int]]] = []  # (step, {sequence: tokens}) per decode

        def recorded(entries: list[tuple[int, int, int, bool]]) -> None:
            calls.append((probe.steps, collections.Counter(seq_id for _, _, seq_id, _ in entries)))

        probe.observe_decodes(recorded)
        with contextlib.ExitStack() as stack:
            leases = sorted((stack.enter_context(ctx.lease()) for _ in range(3)), key=by_id)
            decoder, left, right = leases
            forever = never_end(ctx)
            endless = decoder.generate("Once upon a time", max_tokens=100, logit_bias=forever)
            next(endless)
            with probe.paused():  # the engine waits between steps: both prompts start in the next
                replies = {
                    neighbour: left.generate(neighbour, **greedy),
                    prompt: right.generate(prompt, **greedy),
                }
            together = {text: bits(reply.result()) for text, reply in replies.items()}
            endless.close()
        steps = {step for step, counts in calls if counts.get(left.id, 0) > 1}
        steps |= {step for step, counts in calls if counts.get(right.id, 0) > 1}
        assert len(steps) == 1  # both prompts were evaluated in one step
    assert together == alone


def test_a_release_does_not_wait_for_another_sequences_reply(ctx):
    # Releasing clears the sequence under the engine's guard, which the engine takes again
    # right after each step: with a plain lock, the release waited until every other reply
    # had ended (2 s behind a 300-token one).
    with ctx.lease() as seq:
        other = seq.generate("Once upon a time", max_tokens=200, logit_bias=never_end(ctx))
        next(other)
        with ctx.lease() as mine:
            mine.generate("Hello there", max_tokens=2).result()
        assert not other.finished  # released while the other reply still runs
        other.close()


def test_same_seed_same_text_batched_or_not(ctx):
    kw = {"temperature": 0.9, "top_k": 40, "max_tokens": 16, "seed": 1234}
    serial = _serial(ctx, PROMPTS[:4], **kw)
    batched = _concurrent(ctx, PROMPTS[:4], **kw)
    assert [r.text for r in batched] == [r.text for r in serial]


def test_asyncio_callers_share_batches(ctx):
    async def one(prompt: str) -> str:
        async with ctx.alease() as seq:
            chunks = [chunk async for chunk in seq.agenerate(prompt, temperature=0, max_tokens=12)]
            return "".join(chunks)

    async def main() -> list[str]:
        return await asyncio.gather(*(one(p) for p in PROMPTS[:4]))

    texts = asyncio.run(main())
    assert texts == [r.text for r in _serial(ctx, PROMPTS[:4], temperature=0, max_tokens=12)]


def test_cancel_one_sequence_mid_batch(ctx):
    others: list[object] = []
    started = threading.Event()

    def other(prompt: str) -> None:
        with ctx.lease() as seq:
            started.set()
            others.append(seq.generate(prompt, temperature=0, max_tokens=40).result())

    threads = [threading.Thread(target=other, args=(p,)) for p in PROMPTS[:3]]
    for t in threads:
        t.start()
    started.wait(10)
    with ctx.lease() as seq:
        gen = seq.generate("Count slowly: one, two,", temperature=0, max_tokens=200)
        for i, _ in enumerate(gen):
            if i == 3:
                break
        steps = ctx.probe.steps
        gen.close()
        # Stopped within a step (one may already be under way when we ask).
        assert ctx.probe.steps - steps <= 2
        assert gen.result().finish_reason == "cancelled"
        # The sequence is consistent: llama.cpp holds exactly the tokens seqlease tracks.
        assert seq.n_tokens == len(held_tokens(ctx, seq.id))
        again = seq.generate("Count slowly: one, two,", temperature=0, max_tokens=5).result()
        assert again.n_evaluated == 2  # everything but the last two prompt tokens was kept
    for t in threads:
        t.join(60)
    for result in others:
        assert result.finish_reason in ("length", "eog")
        assert result.n_generated == 40 or result.finish_reason == "eog"


def test_abort_event_and_task_cancellation(ctx):
    abort = threading.Event()
    with ctx.lease() as seq:
        gen = seq.generate("Tell me a story", temperature=0, max_tokens=200, abort=abort)
        next(gen)
        abort.set()
        result = gen.result()
        assert result.finish_reason == "cancelled"
        assert result.n_generated < 200

    async def main() -> None:
        async with ctx.alease() as seq:

            async def read() -> None:
                prompt = "Count slowly: one, two,"  # greedy: known to outlast the 50 ms
                async for _ in seq.agenerate(prompt, temperature=0, max_tokens=200):
                    pass

            completed = ctx.probe.completed
            task = asyncio.create_task(read())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The engine lets go of the sequence promptly, so release does not wait long.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: ctx.probe.completed > completed, 2)
            )

    asyncio.run(main())
    assert ctx.stats().leased == 0


def test_prompt_overflow_raises_before_any_native_call(ctx):
    with ctx.lease() as seq:
        steps = ctx.probe.steps
        long_prompt = "word " * 400
        with pytest.raises(seqlease.ContextOverflowError, match=r"n_ctx=256") as info:
            seq.generate(long_prompt)
        assert "tokens" in str(info.value)
        assert ctx.probe.steps == steps
        assert seq.n_tokens == 0


@pytest.mark.parametrize("n_prompt", [31, 30, 20])
def test_prompt_and_reply_fill_n_ctx_exactly(n_prompt: int) -> None:
    # Off by one before: a prompt of n_ctx - 1 tokens got 2 reply tokens (n_ctx + 1 in all).
    with seqlease.Context(sequences=2, n_ctx=32, n_threads=1) as small, small.lease() as seq:
        model = small.model
        prompt = model.tokenize("one two three four five six seven eight nine ten") * 8
        prompt = prompt[:n_prompt]
        gen = seq.generate(prompt, temperature=0, max_tokens=500, logit_bias=never_end(small))
        result = gen.result()
        assert result.finish_reason == "length"
        assert n_prompt + result.n_generated == 32
        assert seq.n_tokens < 32  # the last reply token is never evaluated


def test_prefix_reuse_evaluates_only_the_suffix(ctx):
    model = ctx.model
    with ctx.lease() as seq:
        first = seq.generate("The history of the printing press", temperature=0, max_tokens=16)
        r1 = first.result()
        assert r1.n_evaluated == r1.n_prompt
        held = list(held_tokens(ctx, seq.id))
        follow = "The history of the printing press" + r1.text + " And then"
        tokens = model.tokenize(follow)
        common = 0
        while common < min(len(held), len(tokens)) and held[common] == tokens[common]:
            common += 1
        before = ctx.probe.evaluated
        r2 = seq.generate(tokens, temperature=0, max_tokens=4).result()
        assert r2.n_evaluated == len(tokens) - common
        assert r2.n_evaluated < len(tokens) // 2
        # What the engine decoded: the suffix, then one token per generated token but the last.
        assert ctx.probe.evaluated - before == r2.n_evaluated + r2.n_generated - 1


def test_stop_string_never_leaks_into_the_stream(ctx):
    with ctx.lease() as seq:
        text = seq.generate("The capital of France is", temperature=0, max_tokens=30).result().text
    stop = text[8:12]
    assert stop.strip()
    with ctx.lease() as seq:
        gen = seq.generate("The capital of France is", temperature=0, max_tokens=30, stop=[stop])
        chunks = list(gen)
    assert "".join(chunks) == text[: text.find(stop)]
    assert gen.result().finish_reason == "stop"


def test_utf8_split_across_tokens_is_reassembled(ctx):
    model = ctx.model
    text = "héllo 😀 wörld ñ"
    pieces = [model.token_to_piece(t) for t in model.tokenize(text, add_bos=False)]
    broken = []
    for piece in pieces:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            broken.append(piece)
    assert broken, "the model should split the emoji across tokens"
    assembler = TextAssembler(())
    chunks = [assembler.feed(p) for p in pieces] + [assembler.finish()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in chunk for chunk in chunks)


def test_errors_reach_only_their_caller(ctx):
    results = _concurrent(ctx, PROMPTS[:3], temperature=0, max_tokens=8)
    with ctx.lease() as seq:
        gen = seq.generate("Count slowly: one, two,", temperature=0, max_tokens=200)
        with pytest.raises(seqlease.SequenceBusyError, match="already generating"):
            seq.generate("Hello again")
        gen.close()
    again = _concurrent(ctx, PROMPTS[:3], temperature=0, max_tokens=8)
    assert [r.text for r in again] == [r.text for r in results]


def test_release_while_generating_cancels_and_clears(ctx):
    seq = ctx.acquire()
    # Greedy on a prompt known to run long: random sampling may hit EOG before the release.
    gen = seq.generate("Count slowly: one, two,", temperature=0, max_tokens=200)
    next(gen)
    seq.release()
    assert gen.result().finish_reason == "cancelled"
    assert held_tokens(ctx, seq.id) == ()
    assert native_pos_max(ctx, seq.id) == -1


def test_released_handle_cannot_generate(ctx):
    with ctx.lease() as seq:
        pass
    with pytest.raises(seqlease.SequenceReleasedError):
        seq.generate("hi")
