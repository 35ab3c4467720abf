"""The engine thread: owns one llama.cpp context and decodes all active sequences together.

llama.cpp allows one thread per context at a time. Here one thread takes new jobs, builds each
batch, decodes it and samples, holding the guard for the iteration; a release clearing a
sequence takes the guard between iterations. Callers only submit jobs and read channels.

A new job first looks for its prompt's prefix in the other sequences and the prefix cache
(:mod:`seqlease.engine.prefixes`) and copies what it finds. If another job is still evaluating
a longer common prefix, the new job waits for it instead of evaluating the same tokens too: 8
requests that arrive together with one new system prompt evaluate it once.

Per-job work (activation, sampler set-up, sampling, detokenizing, delivering text) runs under
:meth:`Engine._isolated`: an exception there fails that job alone, at once, and the engine
serves on. The decode itself is shared: a failed decode fails the jobs in that batch, and only
a fatal code (the context is unusable) stops the engine, failing every job it knows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

from seqlease.backends.base import PrefixStats
from seqlease.backends.worker import JobWorker
from seqlease.engine.layout import KvLayout
from seqlease.engine.ledger import KvLedger
from seqlease.engine.prefixes import Prefixes
from seqlease.engine.sampling import build_sampler
from seqlease.engine.schedule import decode_calls, plan_batch
from seqlease.errors import ContextClosedError, DecodeError, SequenceBusyError
from seqlease.native.context import BatchEntry, NativeContext
from seqlease.native.sampler import SamplerChain
from seqlease.request.job import FinishReason, Job
from seqlease.request.logprobs import token_logprob

__all__ = ["Engine"]

logger = logging.getLogger("seqlease.engine")

_NO_KV_SLOT = 1


class Engine(JobWorker):
    """A thread that serves generation jobs of every sequence of one context in shared batches.

    It owns the context (and its model) from here on: the tokens each sequence holds, the
    guard, and freeing the memory once the thread has stopped.
    """

    def __init__(
        self,
        lib: ModuleType,
        native: NativeContext,
        layout: KvLayout,
        *,
        share_prefixes: bool = True,
        prefill_chunk: int = 128,
    ) -> None:
        """Start the engine thread on ``native``, whose sequences are laid out as ``layout``."""
        super().__init__("seqlease-engine", sequences=layout.sequences, n_ctx=layout.n_ctx_seq)
        self._lib = lib
        self._native = native
        self._model = native.model
        self._prefill_chunk = prefill_chunk
        # A call of at most n_ubatch tokens is not cut by llama.cpp beyond its own split.
        self._budget = min(native.n_batch, native.n_ubatch)
        self._cap = self._budget  # shrinks after "no KV slot", grows back after success
        self._ledger = KvLedger(native)
        self._prefixes = Prefixes(self._ledger, layout, enabled=share_prefixes)
        self._active: list[Job] = []  # engine thread only
        self._waiting: list[Job] = []  # engine thread only: waiting for another's prefix
        self._samplers: dict[Job, SamplerChain] = {}  # engine thread only
        #: Decode steps so far and tokens they evaluated, for tests and benchmarks.
        self.steps = 0
        self.evaluated = 0
        self._start()

    # -- caller side ------------------------------------------------------------------------

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation, then remove every token from its memory."""
        self.stop_sequence(seq_id)
        with self._guard:
            if self._lifetime.freed:
                return
            try:
                self._prefixes.keep(seq_id)
            except Exception:  # the cache is an optimisation: clearing must happen regardless
                logger.exception("caching the prefix of sequence %d failed", seq_id)
            self._ledger.clear(seq_id)

    def fork_sequence(self, src: int, dst: int) -> None:
        """Make the idle, empty ``dst`` hold a copy of everything ``src`` holds now."""
        with self._guard:
            self._ledger.copy(src, dst, self._ledger.n_tokens(src))

    def cut_sequence(self, seq_id: int, prefix: Sequence[int], start: int) -> bool:
        """If the idle ``seq_id`` starts with ``prefix``, drop ``prefix[start:]`` from it.

        The tokens after the prefix move down. Returns ``False``, with nothing changed, where
        the sequence holds something else or its memory cannot move positions.
        """
        with self._idle(seq_id):
            if self._ledger.common(seq_id, prefix) < len(prefix):
                return False
            return self._ledger.cut(seq_id, start, len(prefix))

    def save_sequence(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """The idle ``seq_id``'s tokens and its memory as llama.cpp writes it."""
        with self._idle(seq_id):
            return self._ledger.save(seq_id)

    def load_sequence(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Replace the idle ``seq_id``'s memory by ``data`` (checked by the caller).

        Returns ``False``, with the sequence empty, when llama.cpp refuses it.
        """
        with self._idle(seq_id):
            return self._ledger.load(seq_id, tokens, data)

    @contextlib.contextmanager
    def _idle(self, seq_id: int) -> Iterator[None]:
        """Hold the guard while ``seq_id`` runs no generation: its memory is ours to change."""
        jobs = self._jobs.jobs_of(seq_id)
        if any(not job.cancelled.is_set() for job in jobs):
            raise _busy(seq_id)
        if threading.current_thread() is not self._thread:
            for job in jobs:  # cancelled, and ending at the engine's next step
                job.done.wait()
        with self._guard:
            if self._lifetime.freed:
                raise ContextClosedError("the context is closed: create a new Context")
            if self._jobs.jobs_of(seq_id):
                raise _busy(seq_id)
            yield

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens reused across sequences so far (read without waiting for a step)."""
        return self._prefixes.stats()

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        with self._guard:
            return self._native.seq_pos_max(seq_id) + 1

    def _free(self) -> None:
        self._native.close()
        self._model.close()

    # -- engine thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        while (incoming := self._jobs.take(wait=not (self._active or self._waiting))) is not None:
            with self._guard:
                for job in [j for j in (*self._active, *self._waiting) if j.should_stop()]:
                    self._end(job, "cancelled")
                for job in incoming:
                    self._isolated(job, "starting", self._activate)
                for job in list(self._waiting):
                    self._isolated(job, "starting", self._place)
                if self._active:
                    self._step()
        with self._guard:
            for job in (*self._active, *self._waiting):
                self._end(job, "cancelled")

    def _isolated(self, job: Job, stage: str, work: Callable[[Job], None]) -> None:
        """Run one job's own work; if it raises, that job alone fails."""
        try:
            work(job)
        except Exception as exc:
            self._drop(job)
            self._fail(job, exc, stage)

    def _activate(self, job: Job) -> None:
        """Set up sampling; the job then waits to be placed."""
        if job.should_stop():
            self._finish(job, "cancelled")
            return
        sampler = build_sampler(self._lib, job.params, self._model)
        self._samplers[job] = sampler
        self._waiting.append(job)
        if job.params.repeat_penalty != 1.0:
            for token in job.prompt:
                sampler.accept(token)

    def _place(self, job: Job) -> None:
        """Start the job from the longest prefix held anywhere, or let it wait for a reader.

        The last two prompt tokens are always evaluated: the last one's logits start the
        reply, and a batch of one token would round differently from the evaluation without
        a copied prefix (see :func:`seqlease.engine.schedule.plan_batch`).
        """
        prompt = job.prompt
        limit = max(0, len(prompt) - 2)
        own = min(self._ledger.common(job.seq_id, prompt), limit)
        # Only a reader evaluating from a shareable start will hold a prefix to copy.
        reading = (
            r.prompt
            for r in self._active
            if r.pending and self._ledger.shareable(r.seq_id) == self._ledger.n_tokens(r.seq_id)
        )
        choice = self._prefixes.choose(prompt, job.seq_id, own=own, limit=limit, reading=reading)
        if choice is None:
            return
        source, n = choice
        if source < 0:
            keep = self._ledger.reuse(job.seq_id, n)
        else:
            keep = self._prefixes.copy(source, job.seq_id, n, own=own)
        job.n_past = keep
        job.pending = prompt[keep:]
        job.n_evaluated = len(job.pending)
        self._waiting.remove(job)
        self._active.append(job)

    def _step(self) -> None:
        plan = plan_batch(self._active, self._cap, self._prefill_chunk)
        evaluated = self.evaluated
        for call in decode_calls(plan, streams=not self._native.kv_unified):
            if not self._decode(call):
                break
        if self.evaluated > evaluated:
            self.steps += 1
        # Round-robin: who goes first (and so gets the batch when it is short) changes per step.
        if len(self._active) > 1:
            self._active.append(self._active.pop(0))

    def _decode(self, call: list[tuple[Job, int]]) -> bool:
        """Evaluate one call's tokens, then sample where a reply has its next logits.

        Returns ``False`` where the rest of the step must wait (llama.cpp found no KV slot).
        """
        entries: list[BatchEntry] = []
        rows: list[tuple[Job, int]] = []  # jobs that sample after this call, and their row
        for job, n in call:
            if job.next_token is not None:
                entries.append((job.next_token, job.n_past, job.seq_id, True))
                rows.append((job, len(entries) - 1))
                continue
            finishing = n == len(job.pending)
            for i, token in enumerate(job.pending[:n]):
                entries.append((token, job.n_past + i, job.seq_id, finishing and i == n - 1))
            if finishing:
                rows.append((job, len(entries) - 1))
        try:
            self._native.decode(entries)
        except DecodeError as exc:
            return self._decode_failed(call, exc)
        self.evaluated += len(entries)
        self._cap = min(self._budget, self._cap * 2)
        for job, n in call:
            if job.next_token is not None:
                self._ledger.appended(job.seq_id, (job.next_token,))
                job.next_token = None
            else:
                self._ledger.appended(job.seq_id, job.pending[:n])
                del job.pending[:n]
            job.n_past += n
        for job, row in rows:
            self._isolated(job, "sampling", functools.partial(self._sample, row=row))
        return True

    def _sample(self, job: Job, *, row: int) -> None:
        token = self._samplers[job].sample(self._native, row)
        logprob = None
        if job.params.logprobs:
            logits = self._native.logit_row(row)
            logprob = token_logprob(logits, token, job.params.top_logprobs, self._model)
        reason = job.add_token(token, self._model, logprob)
        # The sequence holds n_past tokens and this one would be next: prompt plus reply stay
        # within n_ctx, as on the completion backend.
        if reason is None and job.n_past + 1 >= self._native.n_ctx_seq:
            reason = "length"
        if reason is None:
            job.next_token = token
        else:
            self._end(job, reason)

    def _decode_failed(self, call: list[tuple[Job, int]], exc: DecodeError) -> bool:
        """No KV slot: retry smaller. Fatal: stop. Else: fail the jobs of the call."""
        n_tokens = sum(n for _, n in call)
        if exc.code == _NO_KV_SLOT and n_tokens > 1:
            self._cap = max(1, n_tokens // 2)
            logger.warning("no KV slot for %d tokens: retrying with %d", n_tokens, self._cap)
            return False
        if exc.code is not None and exc.code < -1:
            raise exc  # llama.cpp's context is unusable after a fatal decode error
        for job, _ in call:
            # Whatever the failed batch wrote for this sequence is undone; the rest stays.
            self._ledger.truncate(job.seq_id, job.n_past)
            self._drop(job)
            self._fail(job, DecodeError(f"sequence {job.seq_id}: {exc}", exc.code), "decoding")
        return True

    def _end(self, job: Job, reason: FinishReason) -> None:
        self._drop(job)
        self._finish(job, reason)

    def _drop(self, job: Job) -> None:
        """Forget the job's engine-side state: active slot and sampler."""
        if job in self._active:
            self._active.remove(job)
        if job in self._waiting:
            self._waiting.remove(job)
        sampler = self._samplers.pop(job, None)
        if sampler is not None:
            sampler.close()


def _busy(seq_id: int) -> SequenceBusyError:
    return SequenceBusyError(
        f"sequence {seq_id} is generating: read that reply to its end or close() it before "
        "saving, loading or cutting the sequence's memory"
    )
