"""Chats longer than their sequence: overflow="shift" and overflow="error", on both backends."""

from __future__ import annotations

import pytest

import seqlease
from helpers import never_end, settle

FILLER = [
    "Tell me about the sea.",
    "What is a good breakfast?",
    "Describe a forest.",
    "Why is the sky blue?",
]
NAME_RULE = "You are Zorblax, a robot. When asked your name, say Zorblax."
GREEDY = {"temperature": 0, "max_tokens": 40}


def _talk(chat: seqlease.ChatSession, turns: int) -> list[tuple[int, str, seqlease.Result]]:
    """``turns`` turns, asking its name every third one; (turn, reply, result) of those."""
    asked = []
    for i in range(turns):
        question = "What is your name?" if i % 3 == 2 else FILLER[i % len(FILLER)]
        reply = chat.prompt(question, **GREEDY)
        assert chat.last_result is not None
        if i % 3 == 2:
            asked.append((i, reply, chat.last_result))
    return asked


@pytest.fixture(scope="module")
def ctx():
    with seqlease.Context(sequences=2, n_ctx=256, n_threads=1) as ctx:
        yield ctx


def test_thirty_turns_in_256_tokens_and_the_system_prompt_still_rules(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt=NAME_RULE)
        asked = _talk(chat, 30)
        assert len(chat.history) == 1 + 2 * 30  # the whole conversation, trimmed or not
        assert chat.history[0] == {"role": "system", "content": NAME_RULE}
        assert seq.n_tokens < 256
    last = asked[-3:]
    assert all(result.n_trimmed >= 40 for _, _, result in last)
    assert all("Zorblax" in reply for _, reply, _ in last), last


def test_without_the_system_prompt_the_name_never_comes(ctx):
    # The control for the test above: the name is the system prompt's doing.
    with ctx.lease() as seq:
        asked = _talk(seqlease.ChatSession(seq), 9)
    assert not any("Zorblax" in reply for _, reply, _ in asked)


def test_after_a_shift_a_turn_evaluates_only_its_own_tokens(ctx):
    # The kept turns' memory moves down (seq_rm + seq_add) instead of being evaluated again.
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt=NAME_RULE)
        shifted = []
        for i in range(12):
            chat.prompt(FILLER[i % len(FILLER)], **GREEDY)
            result = chat.last_result
            assert result is not None
            if result.n_trimmed > (shifted[-1].n_trimmed if shifted else 0):
                shifted.append(result)
        assert len(shifted) >= 3
        for result in shifted:
            assert result.n_evaluated < 24 < result.n_prompt / 4


def test_memory_moved_by_a_shift_is_never_copied_into_another_lease():
    # The kept turns' memory still carries what they attended to (the dropped turns): another
    # lease sending the same tokens must evaluate them itself.
    with seqlease.Context(sequences=2, n_ctx=256, n_threads=1) as ctx, ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
        while chat.last_result is None or chat.last_result.n_trimmed == 0:
            chat.prompt(FILLER[len(chat.history) % len(FILLER)], **GREEDY)
        system, *turns = chat.history  # the prompt leaves out the oldest n_trimmed turns
        window = chat.template.tokenize(seq.model, [system, *turns[chat.last_result.n_trimmed :]])
        hits = ctx.stats().prefix_hits
        with ctx.lease() as other:
            result = other.generate(window, temperature=0, max_tokens=2).result()
        assert result.n_evaluated == result.n_prompt
        assert ctx.stats().prefix_hits == hits


def test_overflow_error_names_the_history_and_changes_nothing(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, overflow="error")
        with pytest.raises(seqlease.ContextOverflowError) as info:
            for i in range(20):
                chat.prompt(FILLER[i % len(FILLER)], **GREEDY)
        message = str(info.value)
        assert "history" in message
        assert "overflow='shift'" in message
        assert "n_ctx=256" in message
        turns = len(chat.history)
        held = seq.n_tokens
        with pytest.raises(seqlease.ContextOverflowError):
            chat.stream("And another thing.")  # at the call, not at the first chunk
        assert len(chat.history) == turns
        assert seq.n_tokens == held
    assert settle(ctx).leased == 0


def test_a_turn_after_a_reply_that_filled_the_sequence(ctx):
    forever = never_end(ctx)
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, overflow="error")
        chat.prompt("Tell me a long story.", temperature=0, max_tokens=1000, logit_bias=forever)
        result = chat.last_result
        assert result is not None
        assert result.finish_reason == "length"
        assert result.n_prompt + result.n_generated == 256
        with pytest.raises(seqlease.ContextOverflowError, match="history"):
            chat.prompt("Go on.", **GREEDY)
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)  # shift: the long story leaves the prompt
        chat.prompt("Tell me a long story.", temperature=0, max_tokens=1000, logit_bias=forever)
        chat.prompt("Go on.", **GREEDY)
        assert chat.last_result is not None
        assert chat.last_result.n_trimmed == 2


def test_the_system_prompt_and_message_alone_too_long(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq, system_prompt="word " * 200)
        with pytest.raises(seqlease.ContextOverflowError, match="alone take"):
            chat.prompt("word " * 100)
        assert seq.n_tokens == 0


@pytest.mark.parametrize("bad", ["drop", None, 1, "SHIFT"])
def test_overflow_takes_shift_or_error(ctx, bad):
    with ctx.lease() as seq, pytest.raises(ValueError, match="overflow must be"):
        seqlease.ChatSession(seq, overflow=bad)


def test_completion_backend_shifts_by_evaluating_again():
    with (
        seqlease.Context(sequences=1, n_ctx=256, n_threads=1, backend="completion") as ctx,
        ctx.lease() as seq,
    ):
        chat = seqlease.ChatSession(seq, system_prompt=NAME_RULE)
        asked = _talk(chat, 12)
        assert asked[-1][2].n_trimmed > 0
        assert "Zorblax" in asked[-1][1]


def test_shifting_chats_leave_other_leases_alone(ctx):
    # Two chats on one context, one shifting every turn: the other's replies are what they
    # are alone.
    def alone() -> list[str]:
        with ctx.lease() as seq:
            chat = seqlease.ChatSession(seq, system_prompt="Be brief.")
            return [chat.prompt(q, **GREEDY) for q in FILLER[:2]]

    expected = alone()
    with ctx.lease() as long_seq, ctx.lease() as short_seq:
        long_chat = seqlease.ChatSession(long_seq, system_prompt=NAME_RULE)
        short_chat = seqlease.ChatSession(short_seq, system_prompt="Be brief.")
        _talk(long_chat, 8)
        got = [short_chat.prompt(q, **GREEDY) for q in FILLER[:2]]
        _talk(long_chat, 4)
    assert got == expected
