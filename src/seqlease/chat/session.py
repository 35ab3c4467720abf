"""``ChatSession``: an ephemeral chat bound to one explicit, live, leased sequence."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Generator
from typing import Any

from seqlease.chat.template import USER_TURN_MARKERS, ChatTemplate
from seqlease.engine.job import Result
from seqlease.engine.params import SamplingParams, sanitize
from seqlease.errors import EmptyPromptError, MissingSequenceError
from seqlease.sequence import Sequence

__all__ = ["ChatSession"]

logger = logging.getLogger("seqlease.chat")

_FIX = "lease one first: `with ctx.lease() as seq: chat = ChatSession(seq)`"


def _require_live_sequence(seq: object) -> Sequence:
    """The founding bug was a session without a sequence: refuse to build one."""
    if isinstance(seq, Sequence):
        if seq.released:
            raise MissingSequenceError(
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
    released. Two prompts on one session are served one after the other, never interleaved.
    """

    def __init__(self, seq: Sequence, *, system_prompt: str | None = None) -> None:
        """Bind to ``seq``; raises :class:`MissingSequenceError` without a live sequence."""
        self._seq = _require_live_sequence(seq)
        self._template = ChatTemplate.from_model(seq.context.backend.model)
        self._history: list[dict[str, str]] = []
        if system_prompt:
            self._history.append({"role": "system", "content": system_prompt})
        self._turn = threading.Lock()  # sync callers take turns
        self._aturn: asyncio.Lock | None = None  # async callers take turns (per event loop)
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
            MissingSequenceError: the session's lease has ended.

        """
        return "".join(self.stream(text, **sampling))

    def stream(self, text: str, **sampling: Any) -> Generator[str, None, None]:
        """Like :meth:`prompt`, yielding the reply in chunks as it is generated."""
        tokens, params = self._prepare(text, sampling)
        with self._turn:
            gen = self._seq.generate_with(tokens, params)
            with gen:
                yield from gen
            self._record(text, gen.result())

    async def aprompt(self, text: str, **sampling: Any) -> str:
        """Async :meth:`prompt`."""
        return "".join([chunk async for chunk in self.astream(text, **sampling)])

    async def astream(self, text: str, **sampling: Any) -> AsyncGenerator[str, None]:
        """Async :meth:`stream`; cancelling the task stops the reply within one step."""
        tokens, params = self._prepare(text, sampling)
        if self._aturn is None:
            self._aturn = asyncio.Lock()
        async with self._aturn:
            gen = self._seq.agenerate_with(tokens, params)
            try:
                async for chunk in gen:
                    yield chunk
            finally:
                await gen.aclose()
            self._record(text, await gen.result())

    def _prepare(self, text: str, sampling: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        if self._closed or self._seq.released:
            raise MissingSequenceError(
                f"this session's sequence {self._seq.id} was released: {_FIX}"
            )
        if not isinstance(text, str) or not text.strip():
            raise EmptyPromptError(f"the prompt is empty: got {text!r}; send some text")
        if sampling.get("stop") is None:
            sampling = {**sampling, "stop": USER_TURN_MARKERS + self._template.end_of_turn}
        params = sanitize(**sampling)  # unknown names raise TypeError, bad values ValueError
        rendered = self._template.render([*self._history, {"role": "user", "content": text}])
        model = self._seq.context.backend.model
        bos = self._template.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer.
        tokens = model.tokenize(rendered, add_special=not (bos and rendered.startswith(bos)))
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
