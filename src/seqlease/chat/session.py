"""``ChatSession``: an ephemeral chat bound to one explicit, live, leased sequence."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, Generator
from typing import Any, Literal

from seqlease.chat.saved import SavedChat
from seqlease.chat.template import ChatTemplate
from seqlease.chat.turns import TurnGuard
from seqlease.checks import check_text, describe
from seqlease.errors import (
    BackendUnavailableError,
    ContextOverflowError,
    MissingSequenceError,
    SessionReleasedError,
    StateError,
)
from seqlease.persist.sequence_state import IncompatibleState
from seqlease.request.job import Result
from seqlease.request.params import SamplingParams, sanitize
from seqlease.request.prompt import check_text_fits, common_prefix, prompt_text
from seqlease.sequence import Sequence

__all__ = ["ChatSession", "Overflow"]

#: What a chat does when the next turn would not fit its sequence.
Overflow = Literal["shift", "error"]

logger = logging.getLogger("seqlease.chat")

_FIX = "lease one first: `with ctx.lease() as seq: chat = ChatSession(seq)`"


def _require_live_sequence(seq: object) -> Sequence:
    """The founding bug was a session without a sequence: refuse to build one."""
    if isinstance(seq, Sequence):
        if seq.released:
            raise SessionReleasedError(
                f"sequence {seq.id} was already released, so a session cannot use it: {_FIX}"
            )
        return seq
    from seqlease.context import Context

    if seq is None:
        what = "no sequence (None)"
    elif isinstance(seq, Context):
        what = "a Context, not a leased Sequence"
    else:
        what = f"a {type(seq).__name__}, not a leased Sequence"
    raise MissingSequenceError(f"ChatSession needs a live sequence but got {what}: {_FIX}")


class ChatSession:
    """A conversation on one leased sequence; it lives no longer than the lease.

    The sequence keeps the conversation in its KV memory, so each turn evaluates only the new
    tokens. When the lease ends the session is closed first, then the sequence is cleared and
    released. Whole-reply calls from several threads or tasks take turns; a new turn while a
    stream of this session is still open raises :class:`SessionBusyError`.

    When a turn would not fit the sequence (``overflow="shift"``, the default), the oldest
    turns leave the prompt: the system prompt stays, and as many recent turns as fit with
    room for the reply (``max_tokens``, at most half of ``n_ctx``). Where llama.cpp can move
    positions, the memory of the kept turns is moved, not evaluated again.
    ``Result.n_trimmed`` (in :attr:`last_result`) says how many messages the prompt left out;
    :attr:`history` keeps them all. ``overflow="error"`` raises
    :class:`ContextOverflowError` instead.
    """

    def __init__(
        self,
        seq: Sequence,
        *,
        system_prompt: str | None = None,
        overflow: Overflow = "shift",
    ) -> None:
        """Bind to ``seq``; raises :class:`MissingSequenceError` without a live sequence."""
        self._seq = _require_live_sequence(seq)
        if system_prompt is not None:
            check_text("system_prompt", system_prompt)
        if overflow not in ("shift", "error"):
            raise ValueError(f"overflow must be 'shift' or 'error', not {describe(overflow)}")
        self._overflow = overflow
        self._model = seq.model
        self._template = ChatTemplate.from_model(self._model)
        self._history: list[dict[str, str]] = []
        if system_prompt:
            self._history.append({"role": "system", "content": system_prompt})
        self._trimmed = 0  # oldest messages after the system prompt left out of the prompt
        self._turns = TurnGuard()
        self._closed = False
        #: The last reply's numbers (tokens evaluated and generated, time), once there is one.
        self.last_result: Result | None = None
        #: How a resumed session got its conversation back: ``"state"`` (the saved memory was
        #: loaded; the next turn evaluates only its own tokens) or ``"history"`` (it could
        #: not be; the next turn evaluates the whole history). ``None`` if not resumed.
        self.resumed_from: Literal["state", "history"] | None = None
        seq.add_closer(self.close)

    @classmethod
    def resume(
        cls, seq: Sequence, saved: SavedChat, *, overflow: Overflow = "shift"
    ) -> ChatSession:
        """Continue a :class:`SavedChat` on ``seq``, a freshly leased sequence.

        ``seq`` may belong to any :class:`Context` of the same model file. The saved memory
        is loaded, so the next turn evaluates only its own tokens. Where that cannot be (the
        completion backend, a binding without ``llama_state_seq_*``, another llama-cpp-python
        version or cache setting) the session re-evaluates its history on the next turn,
        says so in :attr:`resumed_from` (``"history"``) and logs a warning.

        Raises:
            StateError: the chat was saved with another model, or its memory is larger than
                this sequence (the sequence is left empty).
            MissingSequenceError: ``seq`` is not a live leased sequence.
            TypeError: ``saved`` is not a :class:`SavedChat`.

        """
        if not isinstance(saved, SavedChat):
            raise TypeError(
                f"saved must be a SavedChat (from chat.save() or SavedChat.from_bytes), not "
                f"{describe(saved)}"
            )
        chat = cls(seq, overflow=overflow)
        try:
            why = chat._restore(saved)
        except BaseException:
            chat.close()
            raise
        chat.resumed_from = "history" if why else "state"
        if why:
            logger.warning(
                "the chat resumed on sequence %d evaluates its %d messages again on its next "
                "turn: %s",
                seq.id,
                len(saved.history),
                why,
            )
        return chat

    def _restore(self, saved: SavedChat) -> str:
        """Take ``saved``'s conversation; why its memory could not be loaded ("" if it was)."""
        if saved.model != self._model.fingerprint:
            raise StateError(
                "this chat was saved with another model (the fingerprints of the model files "
                "differ): resume it on a Context of the model that saved it"
            )
        self._template = ChatTemplate.from_model(self._model, saved.template)
        self._history = [dict(m) for m in saved.history]
        self._trimmed = saved.trimmed
        if saved.state is None:
            return "it was saved without the sequence's memory (completion backend or binding)"
        try:
            self._seq.load_state(saved.state)
        except (IncompatibleState, BackendUnavailableError) as exc:
            return str(exc)
        return ""

    def save(self) -> SavedChat:
        """The conversation with the sequence's memory, to :meth:`resume` later or elsewhere.

        ``.to_bytes()`` gives bytes to store. Between turns only: raises
        :class:`SessionBusyError` while a reply or stream of this session is running.
        """
        self._check_open()
        with self._turns.exclusive():
            try:
                state: bytes | None = self._seq.save_state()
            except BackendUnavailableError:
                state = None
            return SavedChat(
                history=tuple(self.history),
                template=self._template.source,
                model=self._model.fingerprint,
                state=state,
                trimmed=self._trimmed,
            )

    @property
    def sequence(self) -> Sequence:
        """The leased sequence this session runs on."""
        return self._seq

    @property
    def template(self) -> ChatTemplate:
        """The chat template the session renders its prompts with (compiled once per model).

        ``chat.template.tokenize(chat.sequence.model, messages)`` gives the tokens of any
        conversation as the session would send it.
        """
        return self._template

    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation so far, as ``{"role": ..., "content": ...}`` dicts (a copy)."""
        return [dict(m) for m in self._history]

    @property
    def closed(self) -> bool:
        """Whether the session was closed (by :meth:`close` or the end of its lease)."""
        return self._closed

    def close(self) -> None:
        """Close the session; the sequence stays leased until its lease ends. Idempotent."""
        self._closed = True
        self._seq.remove_closer(self.close)

    # -- turns ------------------------------------------------------------------------------

    def prompt(self, text: str, **sampling: Any) -> str:
        """Send ``text`` as the user's turn and return the whole reply.

        Sampling: ``temperature=0.6, top_p=0.9, top_k=40, max_tokens=256, stop=None,
        seed=None``. A reply always stops at the end of its turn, the chat template's turn
        markup (the user-turn marker ``USER:`` only in the plain layout of a model without a
        template); ``stop`` adds strings to that, it never replaces it.

        Raises:
            EmptyPromptError: ``text`` is empty or whitespace only.
            SessionReleasedError: the session's lease has ended (a ``MissingSequenceError``).
            SessionBusyError: a stream of this session is still open.

        """
        return "".join(self._run_turn(self._prepare(text, sampling), streaming=False))

    def stream(self, text: str, **sampling: Any) -> Generator[str, None, None]:
        """Like :meth:`prompt`, yielding the reply in chunks as it is generated.

        Close the stream (or read it to the end) before the next turn.
        """
        return self._run_turn(self._prepare(text, sampling), streaming=True)

    async def aprompt(self, text: str, **sampling: Any) -> str:
        """Async :meth:`prompt`."""
        stream = self._arun_turn(self._prepare(text, sampling), streaming=False)
        return "".join([chunk async for chunk in stream])

    def astream(self, text: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """Async :meth:`stream`; cancelling the task stops the reply within one step."""
        return self._arun_turn(self._prepare(text, sampling), streaming=True)

    # A turn's work is _prepare (at the call), _enter and _record; _run_turn and _arun_turn
    # only wait for it, the one blocking, the other awaiting, step for step the same.

    def _run_turn(self, turn: _Turn, *, streaming: bool) -> Generator[str, None, None]:
        with self._turns.turn(streaming=streaming):
            with self._seq.generate_with(self._enter(turn), turn.params) as gen:
                yield from gen
            self._record(turn, gen.result())

    async def _arun_turn(self, turn: _Turn, *, streaming: bool) -> AsyncGenerator[str, None]:
        async with self._turns.aturn(streaming=streaming):
            async with self._seq.agenerate_with(self._enter(turn), turn.params) as gen:
                async for chunk in gen:
                    yield chunk
            self._record(turn, await gen.result())

    def _check_open(self) -> None:
        if self._closed or self._seq.released:
            raise SessionReleasedError(
                f"this session's sequence {self._seq.id} was released: {_FIX}"
            )

    def _prepare(self, text: object, sampling: dict[str, Any]) -> _Turn:
        """Check a turn's arguments and build its prompt at the call, before it waits."""
        self._check_open()
        text = prompt_text("text", text)
        sampling = {**sampling, "stop": self._template.stops(sampling.get("stop"))}
        params = sanitize(**sampling)  # unknown names raise TypeError, bad values ValueError
        tokens, trimmed = self._window(text, params)  # one that cannot fit raises here
        return _Turn(text, params, tokens, trimmed, self._version())

    def _version(self) -> tuple[int, int]:
        """Changes whenever the prompt of the next turn would (a turn recorded, a shift)."""
        return len(self._history), self._trimmed

    def _enter(self, turn: _Turn) -> list[int]:
        """In the turn: the prompt; turns it leaves out are cut from the sequence's memory."""
        tokens, trimmed = turn.tokens, turn.trimmed
        if turn.version != self._version():  # another turn ran while this one waited
            tokens, trimmed = self._window(turn.text, turn.params)
        if trimmed > self._trimmed:
            self._shift(self._trimmed, trimmed)
            self._trimmed = trimmed
        return tokens

    def _window(self, text: str, params: SamplingParams) -> tuple[list[int], int]:
        """The prompt of a turn saying ``text``, and how many old messages it leaves out."""
        n_ctx = self._seq.n_ctx
        check_text_fits(len(text), self._model, n_ctx)  # no trimming makes room for that
        head, turns = self._split()
        user = {"role": "user", "content": text}
        trimmed = self._trimmed
        tokens = self._tokens([*head, *turns[trimmed:], user])
        if self._overflow == "shift":
            room = min(params.max_tokens, n_ctx // 2)
            while len(tokens) + room > n_ctx and trimmed < len(turns):
                trimmed = _next_user_turn(turns, trimmed + 1)
                tokens = self._tokens([*head, *turns[trimmed:], user])
        if len(tokens) >= n_ctx:
            if self._overflow == "error":
                raise ContextOverflowError(
                    f"this chat's history ({len(turns)} messages) and the new message take "
                    f"{len(tokens)} tokens, and a sequence holds n_ctx={n_ctx} with at least "
                    "one left for the reply: use ChatSession(seq, overflow='shift') (the "
                    "default) to drop the oldest turns, start a new ChatSession, or create "
                    "the Context with a larger n_ctx"
                )
            raise ContextOverflowError(
                f"the system prompt and the new message alone take {len(tokens)} tokens, and a "
                f"sequence holds n_ctx={n_ctx} with at least one left for the reply: shorten "
                "them or create the Context with a larger n_ctx"
            )
        return tokens, trimmed

    def _shift(self, before: int, after: int) -> None:
        """Cut messages ``[before, after)`` after the system prompt out of the memory.

        The kept turns' memory moves down (llama.cpp ``seq_rm`` + ``seq_add``) instead of
        being evaluated again. Where the template does not render the kept turns the same
        way, or the memory cannot move, nothing is cut: the engine then evaluates again
        whatever no longer matches.
        """
        head, turns = self._split()
        old = self._tokens([*head, *turns[before:]], generation=False)
        new = self._tokens([*head, *turns[after:]], generation=False)
        start = common_prefix(old, new)
        kept = common_prefix(old[start:][::-1], new[start:][::-1])  # kept turns, from the end
        if kept and start + kept == len(new):
            self._seq.shift(old[: len(old) - kept], start)

    def _split(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        """The system prompt (if any) and the turns after it."""
        n = 1 if self._history and self._history[0]["role"] == "system" else 0
        return self._history[:n], self._history[n:]

    def _tokens(self, messages: list[dict[str, str]], *, generation: bool = True) -> list[int]:
        return self._template.tokenize(self._model, messages, add_generation_prompt=generation)

    def _record(self, turn: _Turn, result: Result) -> None:
        if result.finish_reason == "cancelled":
            return  # an interrupted turn is not part of the conversation
        result = dataclasses.replace(result, n_trimmed=self._trimmed)
        self._history.append({"role": "user", "content": turn.text})
        # The reply as generated, as the sequence holds it: the next turn's prompt then
        # renders it to the same tokens and evaluates only what follows.
        self._history.append({"role": "assistant", "content": result.text})
        logger.info(
            "reply on sequence %d in %.2f s: %d prompt tokens (%d evaluated, %d messages "
            "left out), %d generated, %d characters, finished by %s",
            self._seq.id,
            result.seconds,
            result.n_prompt,
            result.n_evaluated,
            result.n_trimmed,
            result.n_generated,
            len(result.text),
            result.finish_reason,
        )
        self.last_result = result


@dataclasses.dataclass(frozen=True)
class _Turn:
    """A turn checked at the call: its text, sampling, and prompt as the history stood."""

    text: str
    params: SamplingParams
    tokens: list[int]
    trimmed: int
    version: tuple[int, int]


def _next_user_turn(turns: list[dict[str, str]], i: int) -> int:
    """The index of the first user message at or after ``i`` (``len(turns)`` if none)."""
    while i < len(turns) and turns[i]["role"] != "user":
        i += 1
    return i
