"""``ChatSession``: an ephemeral chat bound to one explicit, live, leased sequence."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Generator
from typing import Any

from seqlease.chat.template import USER_TURN_MARKERS, ChatTemplate
from seqlease.chat.turns import TurnGuard
from seqlease.checks import check_text
from seqlease.errors import MissingSequenceError, SessionReleasedError
from seqlease.request.job import Result
from seqlease.request.params import SamplingParams, sanitize
from seqlease.request.prompt import check_prompt, prompt_text
from seqlease.sequence import Sequence

__all__ = ["ChatSession"]

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
    """

    def __init__(self, seq: Sequence, *, system_prompt: str | None = None) -> None:
        """Bind to ``seq``; raises :class:`MissingSequenceError` without a live sequence."""
        self._seq = _require_live_sequence(seq)
        if system_prompt is not None:
            check_text("system_prompt", system_prompt)
        self._model = seq._backend.model
        self._template = ChatTemplate.from_model(self._model)
        self._history: list[dict[str, str]] = []
        if system_prompt:
            self._history.append({"role": "system", "content": system_prompt})
        self._turns = TurnGuard()
        self._closed = False
        #: The last reply's numbers (tokens evaluated and generated, time), once there is one.
        self.last_result: Result | None = None
        seq.add_closer(self.close)

    @property
    def sequence(self) -> Sequence:
        """The leased sequence this session runs on."""
        return self._seq

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
        seed=None``. ``stop=None`` stops at user-turn markers and the template's end of turn.

        Raises:
            EmptyPromptError: ``text`` is empty or whitespace only.
            SessionReleasedError: the session's lease has ended (a ``MissingSequenceError``).
            SessionBusyError: a stream of this session is still open.

        """
        return "".join(self._turn(text, sampling, streaming=False))

    def stream(self, text: str, **sampling: Any) -> Generator[str, None, None]:
        """Like :meth:`prompt`, yielding the reply in chunks as it is generated.

        Close the stream (or read it to the end) before the next turn.
        """
        return self._turn(text, sampling, streaming=True)

    def _turn(
        self, text: str, sampling: dict[str, Any], *, streaming: bool
    ) -> Generator[str, None, None]:
        tokens, params = self._prepare(text, sampling)  # raises at the call, not at next()
        return self._run_turn(text, tokens, params, streaming)

    def _run_turn(
        self, text: str, tokens: list[int], params: SamplingParams, streaming: bool
    ) -> Generator[str, None, None]:
        with self._turns.turn(streaming=streaming):
            gen = self._seq.generate_with(tokens, params)
            with gen:
                yield from gen
            self._record(text, gen.result())

    async def aprompt(self, text: str, **sampling: Any) -> str:
        """Async :meth:`prompt`."""
        tokens, params = self._prepare(text, sampling)
        stream = self._arun_turn(text, tokens, params, streaming=False)
        return "".join([chunk async for chunk in stream])

    def astream(self, text: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """Async :meth:`stream`; cancelling the task stops the reply within one step."""
        tokens, params = self._prepare(text, sampling)
        return self._arun_turn(text, tokens, params, streaming=True)

    async def _arun_turn(
        self, text: str, tokens: list[int], params: SamplingParams, *, streaming: bool
    ) -> AsyncGenerator[str, None]:
        async with self._turns.aturn(streaming=streaming):
            gen = self._seq.agenerate_with(tokens, params)
            try:
                async for chunk in gen:
                    yield chunk
            finally:
                await gen.aclose()
            self._record(text, await gen.result())

    def _prepare(self, text: object, sampling: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        if self._closed or self._seq.released:
            raise SessionReleasedError(
                f"this session's sequence {self._seq.id} was released: {_FIX}"
            )
        text = prompt_text("text", text)
        if sampling.get("stop") is None:
            sampling = {**sampling, "stop": USER_TURN_MARKERS + self._template.end_of_turn}
        params = sanitize(**sampling)  # unknown names raise TypeError, bad values ValueError
        rendered = self._template.render([*self._history, {"role": "user", "content": text}])
        bos = self._template.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        tokens = self._model.tokenize(rendered, add_special=not (bos and rendered.startswith(bos)))
        check_prompt(tokens, self._seq._backend.n_ctx)  # at the call, not at the first chunk
        return tokens, params

    def _record(self, text: str, result: Result) -> None:
        if result.finish_reason == "cancelled":
            return  # an interrupted turn is not part of the conversation
        self._history.append({"role": "user", "content": text})
        self._history.append({"role": "assistant", "content": result.text.strip()})
        logger.info(
            "reply on sequence %d in %.2f s: %d prompt tokens (%d evaluated), %d generated, "
            "%d characters, finished by %s",
            self._seq.id,
            result.seconds,
            result.n_prompt,
            result.n_evaluated,
            result.n_generated,
            len(result.text),
            result.finish_reason,
        )
        self.last_result = result
