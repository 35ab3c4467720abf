"""ChatSession and the seed note's scenario, on the real default model."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

import seqlease
from helpers import free_slots_are_empty, settle
from seqlease.chat.template import FALLBACK_TEMPLATE, USER_TURN_MARKERS, ChatTemplate

BACKENDS = ["session", "completion"]


@pytest.fixture(scope="module", params=BACKENDS)
def ctx(request):
    with seqlease.Context(sequences=2, n_ctx=512, n_threads=1, backend=request.param) as ctx:
        yield ctx


def _clean(ctx: seqlease.Context) -> seqlease.PoolStats:
    stats = settle(ctx)
    assert stats.leased == 0
    assert stats.free == stats.size
    assert stats.leaked == 0
    assert free_slots_are_empty(ctx) == []
    return stats


@pytest.mark.parametrize("bad", [None, "ctx", 42, "released"])
def test_session_refuses_to_exist_without_a_live_sequence(ctx, bad):
    if bad == "ctx":
        bad = ctx
    elif bad == "released":
        with ctx.lease() as seq:
            pass
        bad = seq
    with pytest.raises(seqlease.MissingSequenceError, match=r"with ctx\.lease\(\) as seq"):
        seqlease.ChatSession(bad)
    assert isinstance(seqlease.MissingSequenceError("x"), TypeError)


def test_prompt_and_history(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="Answer in one short sentence.")
        reply = chat.prompt("What colour is the sky?", temperature=0, max_tokens=24)
        assert reply
        assert chat.history == [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": reply},
        ]
        assert not any(m in reply for m in USER_TURN_MARKERS)


def test_second_turn_evaluates_only_the_new_turn(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        reused = ctx.stats().prefix_tokens_reused
        chat.prompt("Name a fruit.", temperature=0, max_tokens=16)
        first = chat.last_result
        reused = ctx.stats().prefix_tokens_reused - reused
        chat.prompt("And a vegetable?", temperature=0, max_tokens=16)
        second = chat.last_result
        assert first is not None
        assert second is not None
        # A fresh sequence evaluates everything it could not copy from another sequence or
        # the prefix cache (an earlier request's template header, for instance).
        assert first.n_evaluated == first.n_prompt - reused
        # Only the new user turn (and the re-rendered end of the last reply) is evaluated.
        assert second.n_evaluated < second.n_prompt - first.n_prompt // 2
        assert second.n_evaluated <= second.n_prompt - first.n_prompt + first.n_generated


def test_a_reply_is_recorded_as_generated_so_the_next_turn_evaluates_only_itself(ctx):
    # A reply that starts and ends with whitespace, as a model's may: recorded stripped, the
    # history no longer rendered to what the sequence held, and the next turn evaluated the
    # whole reply again.
    reply = " Hello there.\n"
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        grammar = 'root ::= " Hello there.\\n"'
        said = chat.prompt("Say hello.", grammar=grammar, temperature=0, max_tokens=16)
        assert said == reply
        assert chat.history[-1] == {"role": "assistant", "content": reply}
        # What the sequence holds: the first prompt, then the reply's tokens (greedy: the
        # tokenizer's own split, which a sampled reply need not be).
        first = chat.template.tokenize(seq.model, chat.history[:1])
        held = first + ctx.model.tokenize(reply, add_bos=False)
        if ctx.backend.name == "session":
            assert ctx.probe.held(seq.id) == tuple(held)
        chat.prompt("Again.", temperature=0, max_tokens=4)
        second = chat.last_result
        assert second is not None
        prompt = chat.template.tokenize(seq.model, chat.history[:3])
        assert prompt[: len(held)] == held  # the history renders to the tokens held
        if ctx.backend.name == "session":  # the completion backend keeps no sequence's memory
            # Only the new user turn and the template's markup around it are evaluated.
            assert second.n_evaluated == len(prompt) - len(held)


def test_a_reply_may_say_user_and_a_callers_stop_still_cuts_it(ctx):
    # "USER:" is no turn marker of the model's template (ChatML): a reply may say it.
    grammar = 'root ::= "Name: USER: Bob"'
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        assert chat.prompt("Who is it?", grammar=grammar, max_tokens=16) == "Name: USER: Bob"
        assert chat.last_result.finish_reason == "eog"
        cut = chat.prompt("Who is it?", grammar=grammar, max_tokens=16, stop=["Bob"])
        assert cut == "Name: USER: "
        assert chat.last_result.finish_reason == "stop"


def test_the_fallback_layout_stops_at_user_with_or_without_a_callers_stop(ctx, monkeypatch):
    # A model without a template: its turns really are "USER:" / "ASSISTANT:".
    monkeypatch.setattr(ctx.model, "chat_template", None)
    grammar = 'root ::= "Name: USER: Bob"'
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        assert chat.template.is_fallback
        for stop in (None, ["Bob"]):
            assert chat.prompt("Who is it?", grammar=grammar, max_tokens=16, stop=stop) == "Name: "
            assert chat.last_result.finish_reason == "stop"


def test_stops_are_the_end_of_turn_then_the_callers():
    chatml = ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    )
    assert chatml.stops() == chatml.stops(None) == chatml.stops([]) == ("<|im_end|>",)
    assert chatml.stops("x") == ("<|im_end|>", "x")
    assert chatml.stops(["x", "<|im_end|>", "y"]) == ("<|im_end|>", "x", "y")
    assert "USER:" not in chatml.stops()
    fallback = ChatTemplate(None)
    assert fallback.stops() == USER_TURN_MARKERS
    assert fallback.stops(["x"]) == (*USER_TURN_MARKERS, "x")
    with pytest.raises(TypeError, match="stop"):
        chatml.stops(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop"):
        chatml.stops([""])


def test_stream_and_async_forms_agree(ctx):
    with ctx.lease() as seq:
        streamed = "".join(
            seqlease.ChatSession(seq).stream("Say hello.", temperature=0, max_tokens=12)
        )

    async def main() -> tuple[str, str]:
        async with ctx.alease() as seq:
            a = await seqlease.ChatSession(seq).aprompt("Say hello.", temperature=0, max_tokens=12)
        async with ctx.alease() as seq:
            chat = seqlease.ChatSession(seq)
            b = "".join([c async for c in chat.astream("Say hello.", temperature=0, max_tokens=12)])
        return a, b

    a, b = asyncio.run(main())
    assert streamed == a == b


def test_closing_the_stream_early_stops_the_reply_and_sessions_share_the_template(ctx):
    async def main() -> seqlease.Result | None:
        async with ctx.alease() as seq:
            chat = seqlease.ChatSession(seq)
            stream = chat.astream("Count to one hundred.", temperature=0, max_tokens=200)
            await anext(stream)
            await stream.aclose()  # typed as an AsyncGenerator, so this is allowed
            assert seqlease.ChatSession(seq).template is chat.template  # compiled once
            return chat.last_result

    assert asyncio.run(main()) is None  # the reply never completed
    assert _clean(ctx).leased == 0


def test_concurrent_prompts_on_one_session_take_turns(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        errors: list[BaseException] = []

        def ask(q: str) -> None:
            try:
                chat.prompt(q, temperature=0, max_tokens=8)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(q,)) for q in ("One?", "Two?")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        roles = [m["role"] for m in chat.history]
        assert roles == ["user", "assistant", "user", "assistant"]
        # The turn that waited was prompted with the first exchange, not the history it saw
        # when it was called.
        assert chat.last_result is not None
        assert chat.last_result.n_prompt == len(chat.template.tokenize(seq.model, chat.history[:3]))


def test_parameters_are_sanitized(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        # Non-finite values fall back to the defaults instead of reaching llama.cpp.
        chat.prompt("Hi", temperature=math.nan, top_p=math.inf, max_tokens=4)
        with pytest.raises(ValueError, match="max_tokens"):
            chat.prompt("Hi", max_tokens=0)
        for empty in ("", "   \n\t"):
            with pytest.raises(seqlease.EmptyPromptError):
                chat.prompt(empty)
        with pytest.raises(TypeError):
            chat.prompt("Hi", temprature=0.5)
        assert len(chat.history) == 2


def test_session_closes_before_the_sequence_is_released(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        chat.prompt("Hi", max_tokens=4)
    assert chat.closed
    with pytest.raises(seqlease.MissingSequenceError, match="released"):
        chat.prompt("Again?")
    _clean(ctx)


def test_complete_is_stateless(ctx):
    text = ctx.complete("USER: Say yes.\nASSISTANT:", temperature=0, max_tokens=8)
    assert isinstance(text, str)
    assert "USER:" not in text
    with pytest.raises(seqlease.EmptyPromptError):
        ctx.complete("  ")
    _clean(ctx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_scenario_sequential_then_bursts_of_two(backend):
    """The support note's app: a "Random" button, one ephemeral session per click."""
    for size in (1, 2):
        with seqlease.Context(sequences=size, n_ctx=512, n_threads=1, backend=backend) as ctx:

            def click(timeout: float | None = None) -> str:
                with ctx.lease(timeout=timeout) as seq:
                    chat = seqlease.ChatSession(seq)
                    return chat.prompt("Tell a two-line story.", max_tokens=12)

            for _ in range(6):  # before the fix, the second click failed
                assert click()
            for _ in range(3):  # double clicks
                results: list[object] = []

                def double_click(out: list[object] = results) -> None:
                    out.append(click(timeout=30))

                threads = [threading.Thread(target=double_click) for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(60)
                assert len(results) == 2
                assert all(isinstance(r, str) for r in results)
            if size == 1:
                # "Busy, try again": with the only sequence taken, timeout=0 fails at once.
                with ctx.lease(), pytest.raises(seqlease.PoolExhausted, match="right now"):
                    click(timeout=0)
            stats = _clean(ctx)
            assert stats.acquires == stats.releases >= 12
            assert ctx.backend.name == backend


def test_fallback_template_and_markers():
    template = ChatTemplate(None)
    assert template.is_fallback
    assert template.source == FALLBACK_TEMPLATE
    text = template.render([{"role": "user", "content": "Hi"}])
    assert text == "USER: Hi\nASSISTANT:"
    assert "ASSISTANT:" not in USER_TURN_MARKERS
    assert seqlease.trim_at_stop("story\nUSER: more", USER_TURN_MARKERS) == "story"


def test_template_is_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(seqlease.SeqleaseError, match="chat template"):
        ChatTemplate(evil).render([])
