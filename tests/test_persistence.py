"""Saved sequence states and saved chats, on the real default model (and the tiny one).

Bad states are loaded in child processes: llama.cpp reads a state natively, and a state that
slipped past the checks could abort the process instead of raising.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import seqlease
from helpers import free_slots_are_empty, settle
from seqlease.persist.frame import pack, unpack
from tiny_model import tiny_model_path

QUESTIONS = [
    "Tell me about the sea.",
    "What is a good breakfast?",
    "Describe a forest.",
    "Why is the sky blue?",
]
GREEDY = {"temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def ctx():
    with seqlease.Context(sequences=3, n_ctx=512, n_threads=1) as ctx:
        yield ctx


def _chat_after(seq: seqlease.Sequence, turns: int) -> seqlease.ChatSession:
    chat = seqlease.ChatSession(seq, system_prompt="You are a helpful assistant.")
    for question in QUESTIONS[:turns]:
        chat.prompt(question, **GREEDY)
    return chat


def test_a_state_loads_into_another_sequence_and_continues_identically(ctx):
    text = "The history of the printing press is long and " * 8
    with ctx.lease() as a:
        first = a.generate(text, temperature=0, max_tokens=12).result()
        data = a.save_state()
        n_held = a.n_tokens
        follow = text + first.text + " Later,"
        expected = a.generate(follow, temperature=0, max_tokens=16).result()
    with ctx.lease() as b:
        assert b.n_tokens == 0
        b.load_state(data)
        assert b.n_tokens == n_held
        again = b.generate(follow, temperature=0, max_tokens=16).result()
    assert again.text == expected.text
    assert again.n_evaluated == expected.n_evaluated < 10


def test_a_loaded_state_is_never_copied_into_another_lease(ctx):
    # A state is the caller's word for what its tokens' memory is: another lease whose prompt
    # starts with the same tokens must evaluate them itself, never copy that memory.
    # Saved elsewhere, so that nothing in this context's own memory or cache holds the prompt.
    prompt = "A system prompt no other test sends, " * 12
    with (
        seqlease.Context(sequences=3, n_ctx=512, n_threads=1) as elsewhere,
        elsewhere.lease() as a,
    ):
        a.generate(prompt, temperature=0, max_tokens=4).result()
        data = a.save_state()
    with ctx.lease() as holder:
        holder.load_state(data)
        hits = ctx.stats().prefix_hits
        with ctx.lease() as other:
            result = other.generate(prompt + " More", temperature=0, max_tokens=4).result()
        assert result.n_evaluated == result.n_prompt
        assert ctx.stats().prefix_hits == hits


@pytest.mark.parametrize("cut", ["tail", "half", "frame"])
def test_truncated_states_raise_in_process(ctx, cut):
    with ctx.lease() as a:
        a.generate("One two three four five", temperature=0, max_tokens=4).result()
        data = a.save_state()
    bad = {"tail": data[:-1], "half": data[: len(data) // 2], "frame": data[:20]}[cut]
    with ctx.lease() as b:
        with pytest.raises(seqlease.StateError, match="truncated"):
            b.load_state(bad)
        assert b.n_tokens == 0
    assert free_slots_are_empty(ctx) == []


def test_a_refused_state_leaves_the_sequence_as_it_was(ctx):
    with ctx.lease() as a:
        a.generate("Alpha beta gamma delta", temperature=0, max_tokens=4).result()
        held = a.n_tokens
        data = a.save_state()
        with pytest.raises(seqlease.StateError, match="corrupted"):
            a.load_state(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        assert a.n_tokens == held


@pytest.mark.parametrize("bad", [None, "text", 12])
def test_load_state_takes_bytes(ctx, bad):
    with ctx.lease() as seq, pytest.raises(TypeError, match="must be bytes"):
        seq.load_state(bad)


def test_save_and_load_wait_for_no_reply_but_refuse_a_running_one(ctx):
    with ctx.lease() as seq:
        data = seq.save_state()
        gen = seq.generate("Count: one two three", temperature=0, max_tokens=200)
        next(iter(gen))
        with pytest.raises(seqlease.SequenceBusyError, match="generating"):
            seq.save_state()
        with pytest.raises(seqlease.SequenceBusyError, match="generating"):
            seq.load_state(data)
        gen.close()  # a closed reply no longer makes the sequence busy
        assert seq.save_state()


def test_completion_backend_has_no_sequence_state():
    with (
        seqlease.Context(sequences=1, n_ctx=256, n_threads=1, backend="completion") as ctx,
        ctx.lease() as seq,
    ):
        with pytest.raises(seqlease.BackendUnavailableError, match="completion backend"):
            seq.save_state()
        with pytest.raises(seqlease.BackendUnavailableError, match="completion backend"):
            seq.load_state(b"anything")


# -- saved chats ------------------------------------------------------------------------------


def test_resumed_chat_continues_with_exactly_the_uninterrupted_text(ctx):
    # Saved after turn 3, resumed in a fresh Context: turn 4 is the same greedy text, and it
    # evaluates only turn 4's tokens.
    with ctx.lease() as seq:
        chat = _chat_after(seq, 3)
        blob = chat.save().to_bytes()
        expected = chat.prompt(QUESTIONS[3], **GREEDY)
        uninterrupted = chat.last_result
        history = chat.history
    with (
        seqlease.Context(sequences=3, n_ctx=512, n_threads=1) as fresh,
        fresh.lease() as _,
        fresh.lease() as seq,  # another sequence id than the one that saved it
    ):
        resumed = seqlease.ChatSession.resume(seq, seqlease.SavedChat.from_bytes(blob))
        assert resumed.resumed_from == "state"
        assert resumed.history == history[:-2]
        steps = fresh.probe.evaluated
        reply = resumed.prompt(QUESTIONS[3], **GREEDY)
        result = resumed.last_result
        assert reply == expected
        assert result.n_evaluated == uninterrupted.n_evaluated
        # Turn 4's tokens: the new user message and the template around it, nothing earlier.
        turn_4 = len(seq.model.tokenize(QUESTIONS[3])) + 16
        assert result.n_evaluated < turn_4 < result.n_prompt / 5
        assert fresh.probe.evaluated - steps == result.n_evaluated + result.n_generated - 1
        assert resumed.history == history


def test_a_chat_resumed_on_the_completion_backend_re_evaluates_and_says_so(ctx, caplog):
    with ctx.lease() as seq:
        blob = _chat_after(seq, 2).save().to_bytes()
    with (
        seqlease.Context(sequences=1, n_ctx=512, n_threads=1, backend="completion") as other,
        other.lease() as seq,
    ):
        with caplog.at_level(logging.WARNING, logger="seqlease.chat"):
            chat = seqlease.ChatSession.resume(seq, seqlease.SavedChat.from_bytes(blob))
        assert chat.resumed_from == "history"
        assert "evaluates its 5 messages again" in caplog.text
        chat.prompt(QUESTIONS[2], **GREEDY)
        assert chat.last_result.n_evaluated == chat.last_result.n_prompt
        # Saved there, the chat has no memory to carry: resuming re-evaluates, and says so.
        saved = chat.save()
        assert saved.state is None
    with ctx.lease() as seq:
        back = seqlease.ChatSession.resume(seq, saved)
        assert back.resumed_from == "history"
        assert seq.n_tokens == 0


def test_a_state_of_another_binding_version_is_re_evaluated(ctx, caplog):
    with ctx.lease() as seq:
        saved = _chat_after(seq, 1).save()
    assert saved.state is not None
    frame = unpack(saved.state, b"SQLSEQ\x00\x00", 1, "sequence state")
    older = pack(b"SQLSEQ\x00\x00", 1, {**frame.header, "binding": "0.0.1"}, frame.payload)
    with ctx.lease() as seq:
        with pytest.raises(seqlease.StateError, match=r"llama-cpp-python 0\.0\.1"):
            seq.load_state(older)
        with caplog.at_level(logging.WARNING, logger="seqlease.chat"):
            chat = seqlease.ChatSession.resume(seq, dataclasses.replace(saved, state=older))
        assert chat.resumed_from == "history"
        assert "0.0.1" in caplog.text
        assert seq.n_tokens == 0


def test_saved_chat_round_trips_and_refuses_damage(ctx):
    with ctx.lease() as seq:
        saved = _chat_after(seq, 1).save()
    blob = saved.to_bytes()
    assert seqlease.SavedChat.from_bytes(blob) == saved
    with pytest.raises(seqlease.StateError, match="truncated"):
        seqlease.SavedChat.from_bytes(blob[:-7])
    with pytest.raises(seqlease.StateError, match="corrupted"):
        seqlease.SavedChat.from_bytes(blob[:50] + b"X" + blob[51:])
    with pytest.raises(seqlease.StateError, match="not a seqlease saved chat"):
        seqlease.SavedChat.from_bytes(saved.state or b"")
    with ctx.lease() as seq, pytest.raises(TypeError, match="SavedChat"):
        seqlease.ChatSession.resume(seq, blob)  # type: ignore[arg-type]


def test_save_during_a_turn_raises_at_once(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        stream = chat.stream("Count to twenty.", temperature=0, max_tokens=60)
        next(stream)
        with pytest.raises(seqlease.SessionBusyError, match="in progress"):
            chat.save()
        stream.close()
        assert chat.save().history == ()


def test_save_from_another_thread_never_waits_for_a_turn(ctx):
    with ctx.lease() as seq:
        chat = seqlease.ChatSession(seq)
        outcome: list[object] = []
        stream = chat.stream("Count to twenty.", temperature=0, max_tokens=60)
        next(stream)

        def save() -> None:
            try:
                outcome.append(chat.save())
            except seqlease.SessionBusyError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=save)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        assert isinstance(outcome[0], seqlease.SessionBusyError)
        stream.close()
    assert settle(ctx).leased == 0


# -- bad states in child processes ------------------------------------------------------------

_CHILD = """
import json, sys
import seqlease
path, n_ctx = sys.argv[1], int(sys.argv[2])
data = open(path, "rb").read()
with seqlease.Context(sequences=3, n_ctx=n_ctx, n_threads=1) as ctx, ctx.lease() as seq:
    try:
        if sys.argv[3] == "chat":
            seqlease.ChatSession.resume(seq, seqlease.SavedChat.from_bytes(data))
        else:
            seq.load_state(data)
        error = None
    except seqlease.SeqleaseError as exc:
        error = [type(exc).__name__, str(exc)]
    held = seq.n_tokens
    after = seq.generate("Hello there", temperature=0, max_tokens=4).result()
    print(json.dumps({"error": error, "held": held, "after": after.n_generated}))
"""


def _load_in_child(tmp_path: Path, data: bytes, n_ctx: int = 512, kind: str = "state") -> dict:
    path = tmp_path / f"{hashlib.sha256(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(n_ctx), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved(ctx) -> dict[str, bytes]:
    """A state of about 300 tokens, and a saved chat."""
    with ctx.lease() as seq:
        seq.generate("The river flows " * 100, temperature=0, max_tokens=8).result()
        state = seq.save_state()
    with ctx.lease() as seq:
        chat = _chat_after(seq, 1).save().to_bytes()
    with (
        seqlease.Context(tiny_model_path(), sequences=1, n_ctx=256, n_threads=1) as tiny,
        tiny.lease() as seq,
    ):
        seq.generate([5, 6, 7, 8, 9], temperature=0, max_tokens=4).result()
        foreign = seq.save_state()
        foreign_chat = seqlease.ChatSession(seq)
        foreign_chat.prompt("abc", **GREEDY)
        foreign_chat_blob = foreign_chat.save().to_bytes()
    return {"state": state, "chat": chat, "foreign": foreign, "foreign_chat": foreign_chat_blob}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("corrupted payload", "corrupted"),
        ("corrupted header", "corrupted"),
        ("truncated", "truncated"),
        ("padded", "longer than it says"),
        ("foreign model", "another model"),
        ("oversized", "n_ctx=256"),
        ("zeros", "not a seqlease sequence state"),
    ],
)
def test_bad_states_raise_state_error_in_a_child_and_leave_the_sequence_empty(
    tmp_path, saved, case, message
):
    state = saved["state"]
    data, n_ctx = {
        "corrupted payload": (_flip(state, len(state) // 2), 512),
        "corrupted header": (_flip(state, 30), 512),
        "truncated": (state[: len(state) - 4096], 512),
        "padded": (state + b"\0" * 64, 512),
        "foreign model": (saved["foreign"], 512),
        "oversized": (state, 256),
        "zeros": (bytes(len(state)), 512),
    }[case]
    out = _load_in_child(tmp_path, data, n_ctx)
    assert out["error"][0] == "StateError"
    assert message in out["error"][1]
    assert out["held"] == 0
    assert out["after"] == 4  # the engine serves on


@pytest.mark.parametrize("case", ["corrupted", "truncated", "foreign model", "oversized"])
def test_bad_saved_chats_raise_state_error_in_a_child(tmp_path, saved, case):
    chat = saved["chat"]
    data, n_ctx = {
        "corrupted": (_flip(chat, len(chat) // 3), 512),
        "truncated": (chat[:-100], 512),
        "foreign model": (saved["foreign_chat"], 512),
        "oversized": (chat, 64),
    }[case]
    out = _load_in_child(tmp_path, data, n_ctx, kind="chat")
    assert out["error"][0] == "StateError", out
    assert out["held"] == 0
    assert out["after"] == 4


def test_a_forged_state_that_passes_the_checks_is_refused_by_llama_cpp(tmp_path, saved):
    # Damage the checksum cannot see (the frame recomputed around a broken payload) reaches
    # llama.cpp, which refuses it on this binding: StateError, and the sequence is empty.
    frame = unpack(saved["state"], b"SQLSEQ\x00\x00", 1, "sequence state")
    payload = frame.payload[: len(frame.payload) // 2]
    forged = pack(b"SQLSEQ\x00\x00", 1, frame.header, payload)
    out = _load_in_child(tmp_path, forged)
    assert out["error"][0] == "StateError"
    assert "llama.cpp refused" in out["error"][1]
    assert out["held"] == 0
