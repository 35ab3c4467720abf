"""One generation on one sequence, as the engine thread sees it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from seqlease.engine.params import SamplingParams
from seqlease.engine.text import TextAssembler
from seqlease.native.sampler import NativeSampler

__all__ = ["Event", "FinishReason", "Job", "Result"]

logger = logging.getLogger("seqlease.engine")

FinishReason = Literal["eog", "stop", "length", "cancelled", "error"]

#: What a job reports to its consumer: ("text", str), ("done", Result) or ("error", exc).
Event = tuple[str, object]


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


class Job:
    """Mutable state of one generation; touched only by the engine thread once submitted.

    ``emit`` delivers events to the consumer (a queue for threads, the event loop for asyncio)
    and must not block.
    """

    def __init__(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        abort: threading.Event | None,
    ) -> None:
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.emit = emit
        self.abort = abort
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.started = time.monotonic()
        # Filled in by the engine when the job becomes active:
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.n_past = 0  # tokens in the sequence's memory
        self.n_evaluated = 0
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.n_generated = 0
        self.sampler: NativeSampler | None = None
        self.text = TextAssembler(params.stop)
        self.pieces: list[str] = []

    @property
    def decoding(self) -> bool:
        """Whether the prompt is done and the job feeds back its own tokens."""
        return self.next_token is not None

    def cancel(self) -> None:
        """Ask the engine to stop this job at its next step (non-blocking, idempotent)."""
        self.cancelled.set()

    def should_stop(self) -> bool:
        """Whether the consumer gave up on the job."""
        return self.cancelled.is_set() or (self.abort is not None and self.abort.is_set())

    def say(self, text: str) -> None:
        """Deliver a piece of reply text."""
        if text:
            self.pieces.append(text)
            self.emit(("text", text))

    def finish(self, reason: FinishReason) -> None:
        """Flush held-back text, close the sampler and report the result; worker thread only.

        ``done`` is set whatever happens: a release waits on it, and must never hang.
        """
        try:
            if reason != "cancelled":
                self.say(self.text.finish())
            self._close_sampler()
            result = Result(
                text="".join(self.pieces),
                finish_reason=reason,
                n_prompt=len(self.prompt),
                n_evaluated=self.n_evaluated,
                n_generated=self.n_generated,
                seconds=time.monotonic() - self.started,
            )
            self.emit(("done", result))
        except Exception:
            logger.exception("delivering the end of sequence %d's reply failed", self.seq_id)
        finally:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        """Report an error to this job's consumer only; ``done`` is set whatever happens."""
        try:
            self._close_sampler()
            self.emit(("error", error))
        except Exception:
            logger.exception("delivering sequence %d's error failed", self.seq_id)
        finally:
            self.done.set()

    def _close_sampler(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
