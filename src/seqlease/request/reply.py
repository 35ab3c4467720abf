"""One reply as a worker writes it, the same on both backends: tokens in, text and an end out.

A :class:`ReplyWriter` turns sampled tokens into text (UTF-8 across tokens, stop strings held
back), counts them, keeps log-probabilities, decides when the reply is done (end of
generation, a stop string, ``max_tokens``), and ends the request's channel once. Only the
worker thread that runs the request touches it.
"""

from __future__ import annotations

import logging
import time

from seqlease.errors import NativeError, SeqleaseError
from seqlease.request.job import FinishReason, Request, Result, Vocabulary
from seqlease.request.logprobs import TokenLogprob
from seqlease.request.text import TextAssembler

__all__ = ["ReplyWriter", "cancel_request", "fail_request", "reply_error"]

logger = logging.getLogger("seqlease.engine")


def reply_error(exc: BaseException, seq_id: int, stage: str) -> BaseException:
    """What the caller of a reply that failed ``while <stage>`` hears: a seqlease error."""
    if isinstance(exc, SeqleaseError):
        return exc
    logger.error("sequence %d failed while %s", seq_id, stage, exc_info=exc)
    error = NativeError(f"sequence {seq_id}: the reply failed while {stage}: {exc!r}")
    error.__cause__ = exc
    return error


class ReplyWriter:
    """The reply of one :class:`Request`: its text, counts and log-probabilities so far."""

    def __init__(self, request: Request) -> None:
        """An empty reply to ``request``."""
        self.request = request
        self._text = TextAssembler(request.params.stop)
        self._pieces: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        #: Tokens generated so far.
        self.n_generated = 0
        #: Prompt tokens evaluated (the rest were already in the sequence's memory).
        self.n_evaluated = 0

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
        self._say(self._text.feed(vocab.token_to_piece(token)))
        if self._text.stopped:
            return "stop"
        if self.n_generated >= self.request.params.max_tokens:
            return "length"
        return None

    def _say(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            self.request.channel.put(text)

    def finish(self, reason: FinishReason) -> None:
        """Flush held-back text and report the result; ``done`` is set whatever happens."""
        channel = self.request.channel
        try:
            if reason != "cancelled":
                self._say(self._text.finish())
            channel.end(self.result(reason))
        except Exception as exc:  # flushing failed: the caller still hears of the end
            channel.end(reply_error(exc, self.request.seq_id, "ending the reply"))
        finally:
            channel.done.set()

    def fail(self, exc: BaseException, stage: str) -> None:
        """Report ``exc`` (met ``while <stage>``) to this reply's caller only; sets ``done``."""
        fail_request(self.request, reply_error(exc, self.request.seq_id, stage))

    def result(self, reason: FinishReason) -> Result:
        """The reply's numbers so far, as a :class:`Result` that ended for ``reason``."""
        return Result(
            text="".join(self._pieces),
            finish_reason=reason,
            n_prompt=len(self.request.prompt),
            n_evaluated=self.n_evaluated,
            n_generated=self.n_generated,
            seconds=time.monotonic() - self.request.submitted,
            logprobs=tuple(self._logprobs) if self.request.params.logprobs else None,
        )


def fail_request(request: Request, error: BaseException) -> None:
    """End ``request`` with ``error`` (nothing of it ran, or it failed); sets ``done``."""
    try:
        request.channel.end(error)
    finally:
        request.channel.done.set()


def cancel_request(request: Request) -> None:
    """End ``request`` as cancelled before any of it ran; sets ``done``."""
    ReplyWriter(request).finish("cancelled")
