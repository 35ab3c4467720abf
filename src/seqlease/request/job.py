"""One generation on one sequence: what the worker thread fills in and what the caller reads.

A :class:`Job` is written by exactly one worker thread (a backend's) once it is taken from the
queue; its :class:`Channel` carries the text and the end to the caller. The channel never
refers back to the caller's stream object, so a stream that is dropped can be finalized (and
then cancels its job) while the worker still holds the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from seqlease.errors import NativeError
from seqlease.request.logprobs import Pieces, TokenLogprob
from seqlease.request.params import SamplingParams
from seqlease.request.text import TextAssembler

__all__ = ["Channel", "FinishReason", "Job", "Result", "Vocabulary"]

logger = logging.getLogger("seqlease.engine")

FinishReason = Literal["eog", "stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Result:
    """The outcome of one generation."""

    #: The whole reply, stop markers excluded.
    text: str
    #: Why it ended: an end-of-generation token, a stop string, max_tokens or the context
    #: limit ("length"), cancellation, or an error.
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


class Job:
    """One generation's state; once submitted, only the worker thread changes it.

    ``cancel`` may be called from any thread (and from a finalizer): it only sets flags.
    """

    def __init__(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        channel: Channel,
        abort: threading.Event | None,
    ) -> None:
        """A job for ``seq_id``; ``abort`` (anything with ``is_set()``) stops it when set."""
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.channel = channel
        self.abort = abort
        self.cancelled = channel.cancelled
        self.done = channel.done
        self.started = time.monotonic()
        # Filled in by the worker:
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.n_past = 0  # tokens in the sequence's memory
        self.n_evaluated = 0
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.n_generated = 0
        self.text = TextAssembler(params.stop)
        self._pieces: list[str] = []
        self._logprobs: list[TokenLogprob] = []

    @property
    def decoding(self) -> bool:
        """Whether the prompt is done and the job feeds back its own tokens."""
        return self.next_token is not None

    def cancel(self) -> None:
        """Ask the worker to stop this job at its next step (non-blocking, idempotent)."""
        self.channel.cancel()

    def should_stop(self) -> bool:
        """Whether the caller gave up on the job (a broken ``abort`` counts as set)."""
        if self.cancelled.is_set():
            return True
        if self.abort is None:
            return False
        try:
            return bool(self.abort.is_set())
        except Exception:  # the caller's abort object is broken: it cannot un-stop either
            return True

    def add_token(
        self, token: int, vocab: Vocabulary, logprob: TokenLogprob | None = None
    ) -> FinishReason | None:
        """Count a sampled token and deliver its text; why the reply ends with it, if it does.

        The context limit is the backend's to check: only it knows how the sequence fills.
        """
        self.n_generated += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        if vocab.is_eog(token):
            return "eog"
        self.say(self.text.feed(vocab.token_to_piece(token)))
        if self.text.stopped:
            return "stop"
        if self.n_generated >= self.params.max_tokens:
            return "length"
        return None

    def say(self, text: str) -> None:
        """Deliver a piece of reply text."""
        if text:
            self._pieces.append(text)
            self.channel.put(text)

    def finish(self, reason: FinishReason) -> None:
        """Flush held-back text and report the result; ``done`` is set whatever happens."""
        try:
            if reason != "cancelled":
                self.say(self.text.finish())
            self.channel.end(self.result(reason))
        except Exception as exc:  # flushing failed: the caller still hears of the end
            logger.error("ending sequence %d's reply failed", self.seq_id, exc_info=exc)
            error = NativeError(f"sequence {self.seq_id}: ending the reply failed: {exc!r}")
            error.__cause__ = exc
            self.channel.end(error)
        finally:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        """Report an error to this job's caller only; ``done`` is set whatever happens."""
        try:
            self.channel.end(error)
        finally:
            self.done.set()

    def result(self, reason: FinishReason) -> Result:
        """The job's numbers so far, as a :class:`Result` that ended for ``reason``."""
        return Result(
            text="".join(self._pieces),
            finish_reason=reason,
            n_prompt=len(self.prompt),
            n_evaluated=self.n_evaluated,
            n_generated=self.n_generated,
            seconds=time.monotonic() - self.started,
            logprobs=tuple(self._logprobs) if self.params.logprobs else None,
        )
