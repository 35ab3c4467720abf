"""One generation on one sequence: the :class:`Request` as submitted, and its :class:`Channel`.

A request is frozen; its channel carries the text and the end to the caller, and the caller's
cancel back. The channel never refers back to the caller's stream object, so a stream that is
dropped can be finalized (and then cancels its reply) while the worker still holds it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from seqlease.native.guidance import Constraint
from seqlease.request.logprobs import Pieces, TokenLogprob
from seqlease.request.params import SamplingParams

__all__ = ["AbortFlag", "Channel", "FinishReason", "Request", "Result", "Vocabulary"]

FinishReason = Literal["eog", "stop", "length", "cancelled"]


@dataclass(frozen=True)
class Result:
    """The outcome of one generation."""

    #: The whole reply, stop markers excluded.
    text: str
    #: Why it ended: an end-of-generation token, a stop string, max_tokens or the context
    #: limit ("length"), or cancellation. A reply that fails raises instead.
    finish_reason: FinishReason
    #: Tokens of the prompt.
    n_prompt: int
    #: Prompt tokens actually evaluated (the rest were already in the sequence's memory).
    n_evaluated: int
    #: Tokens generated.
    n_generated: int
    #: Seconds from submission to the end.
    seconds: float
    #: One entry per generated token when asked for with ``logprobs=True``, else ``None``.
    logprobs: tuple[TokenLogprob, ...] | None = None
    #: In a :class:`~seqlease.ChatSession`: the oldest messages of the history (after the
    #: system prompt) that this turn's prompt left out to fit ``n_ctx``; else 0.
    n_trimmed: int = 0


class Vocabulary(Pieces, Protocol):
    """What a job needs of the model to turn a token into reply text."""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""
        ...


class Channel:
    """The one link between a reply's reader and its worker, both ways.

    Worker to reader: text chunks, then one end (a :class:`Result` or an error), then
    ``done`` once the worker has let go. Reader to worker: :meth:`cancel`. Putting never blocks
    and never fails on the reader's account: ``notify`` (how an asyncio reader is woken from
    another thread) is only called, and its failure means nobody reads.
    """

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        """``notify`` is called (from the worker thread) after every put and at the end."""
        self._cond = threading.Condition(threading.Lock())
        self._chunks: deque[str] = deque()
        self._end: Result | BaseException | None = None
        self._notify = notify
        #: Set by :meth:`cancel` (or by a finalizer, which may only set a flag).
        self.cancelled = threading.Event()
        #: Set once the worker has let go of the reply (ended, failed or never started).
        self.done = threading.Event()
        self._on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Ask the worker to stop at its next step (non-blocking, idempotent, any thread)."""
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def on_cancel(self, withdraw: Callable[[], None]) -> None:
        """Call ``withdraw`` on :meth:`cancel` (the job table takes back a queued reply)."""
        self._on_cancel = withdraw

    def put(self, text: str) -> None:
        """Add a chunk of text (ignored once the channel has ended)."""
        with self._cond:
            if self._end is not None:
                return
            self._chunks.append(text)
            self._cond.notify_all()
        self._wake()

    def end(self, outcome: Result | BaseException) -> None:
        """Record how the reply ended; only the first end counts."""
        with self._cond:
            if self._end is not None:
                return
            self._end = outcome
            self._cond.notify_all()
        self._wake()

    def _wake(self) -> None:
        if self._notify is not None:
            try:
                self._notify()
            except Exception:  # the reader's event loop is closed: nobody reads any more
                self._notify = None

    @property
    def ended(self) -> bool:
        """Whether the end is known (chunks may still be unread)."""
        return self._end is not None

    def take(self) -> str | None:
        """The next chunk, waiting for one; ``None`` at the end.

        Raises the generation's error once every chunk before it has been taken.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self._end is not None)
            return self._next()

    def take_ready(self) -> str | None:
        """Like :meth:`take` without waiting: ``None`` when nothing is there (yet)."""
        with self._cond:
            return self._next()

    def _next(self) -> str | None:
        if self._chunks:
            return self._chunks.popleft()
        if isinstance(self._end, BaseException):
            raise self._end
        return None

    def wait_end(self, timeout: float | None = None) -> Result | BaseException | None:
        """Wait up to ``timeout`` for the end and return it (``None`` if not reached)."""
        with self._cond:
            if self._end is None:
                self._cond.wait_for(lambda: self._end is not None, timeout)
            return self._end


class AbortFlag(Protocol):
    """What a caller's ``abort`` offers: ``threading.Event`` or anything with ``is_set()``."""

    def is_set(self) -> bool:
        """Whether the caller wants the reply stopped."""
        ...


@dataclass(frozen=True, eq=False)
class Request:
    """One generation as submitted: never changed once made, read by the worker.

    What the worker keeps while it runs the request (its reply so far, its position, its
    sampler) lives with the worker (:class:`~seqlease.request.reply.ReplyWriter` and the
    engine's running state), never here.
    """

    #: The sequence the reply is generated on.
    seq_id: int
    #: Everything the sequence should hold before the reply.
    prompt: list[int]
    params: SamplingParams
    #: Where the reply's text and end go, and where the reader's cancel comes from.
    channel: Channel
    #: The caller's own stop switch, if any.
    abort: AbortFlag | None = None
    #: The reply's grammar, compiled at the call from ``params.grammar`` (``None``: none).
    constraint: Constraint | None = None
    #: When it was submitted (``time.monotonic()``): a reply's seconds count from here.
    submitted: float = dataclasses.field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Ask the worker to stop this reply at its next step (non-blocking, idempotent)."""
        self.channel.cancel()

    def should_stop(self) -> bool:
        """Whether the caller gave up on the reply (a broken ``abort`` counts as set)."""
        if self.channel.cancelled.is_set():
            return True
        if self.abort is None:
            return False
        try:
            return bool(self.abort.is_set())
        except Exception:  # the caller's abort object is broken: it cannot un-stop either
            return True
