"""The engine thread: owns the llama.cpp context and decodes all active sequences together.

llama.cpp allows one thread per context at a time. Here one thread builds each batch, decodes
it and samples, holding the backend's guard for the step; other threads (a release clearing a
sequence) take the guard between steps. Callers in any thread or event loop only submit jobs and
read events; nothing they do blocks the engine, and nothing the engine does blocks an event loop.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from types import ModuleType

from seqlease.engine.job import FinishReason, Job
from seqlease.engine.schedule import plan_batch
from seqlease.errors import ContextClosedError, DecodeError, NativeError, SequenceBusyError
from seqlease.native.context import BatchEntry, NativeContext
from seqlease.native.sampler import NativeSampler

__all__ = ["Engine"]

logger = logging.getLogger("seqlease.engine")

_NO_KV_SLOT = 1


class Engine:
    """A thread that serves generation jobs of every sequence of one context in shared batches."""

    def __init__(
        self,
        lib: ModuleType,
        native: NativeContext,
        guard: threading.RLock,
        *,
        prefill_chunk: int = 128,
    ) -> None:
        """Start the engine thread for ``native``; every native call it makes holds ``guard``."""
        self._lib = lib
        self._native = native
        self._model = native.model
        self._guard = guard
        self._prefill_chunk = prefill_chunk
        self._cap = native.n_batch  # shrinks after "no KV slot", grows back after success
        #: The tokens each sequence holds in KV memory, for prefix reuse. Guarded by ``guard``.
        self.tokens: list[list[int]] = [[] for _ in range(native.n_seq_max)]
        self._cond = threading.Condition()
        self._incoming: list[Job] = []
        self._by_seq: dict[int, Job] = {}
        self._active: list[Job] = []  # engine thread only
        self._stopping = False
        self._dead: BaseException | None = None
        #: Runs on the engine thread when it exits (set by a close that runs on that thread).
        self.on_exit: Callable[[], None] | None = None
        #: Decode steps so far and tokens they evaluated, for tests and benchmarks.
        self.steps = 0
        self.evaluated = 0
        self.thread = threading.Thread(target=self._run, name="seqlease-engine", daemon=True)
        self.thread.start()

    # -- caller side ------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; raises at once if the sequence is busy or the engine cannot serve."""
        with self._cond:
            if self._dead is not None:
                raise NativeError(f"the engine stopped after an error: {self._dead!r}")
            if self._stopping:
                raise ContextClosedError("the context is closed")
            if job.seq_id in self._by_seq:
                raise SequenceBusyError(
                    f"sequence {job.seq_id} is already generating: wait for that reply (or "
                    "cancel it) before starting another on the same sequence"
                )
            self._by_seq[job.seq_id] = job
            self._incoming.append(job)
            self._cond.notify()

    def cancel_sequence(self, seq_id: int) -> None:
        """Stop whatever runs on ``seq_id`` and wait until the engine has let go of it."""
        with self._cond:
            job = self._by_seq.get(seq_id)
            if job is None:
                return
            job.cancel()
            self._cond.notify()
        job.done.wait()

    def wake(self) -> None:
        """Make the engine look at cancellations now rather than after its next step."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """Cancel every job and let the thread exit (non-blocking)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    # -- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._incoming or self._active or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        break
                    incoming, self._incoming = self._incoming, []
                with self._guard:
                    for job in incoming:
                        self._activate(job)
                self._step()
            for job in self._active + self._incoming:
                self._end(job, "cancelled")
        except BaseException as exc:  # a bug or a native failure: fail jobs, never hang them
            logger.exception("the engine thread stopped")
            with self._cond:
                self._dead = exc
                victims = self._active + self._incoming
                self._incoming = []
                self._by_seq.clear()
            for job in victims:
                job.fail(NativeError(f"the engine stopped after an error: {exc!r}"))
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _activate(self, job: Job) -> None:
        """Under the guard: reuse the common prefix, drop the rest, set up sampling."""
        if job.should_stop():
            self._end(job, "cancelled")
            return
        seq, prompt = job.seq_id, job.prompt
        held = self.tokens[seq]
        keep = 0
        for a, b in zip(held, prompt, strict=False):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if keep < len(held):
            if not self._native.seq_rm(seq, keep, -1):  # partial removal can fail (recurrent)
                self._native.seq_rm(seq)
                keep = 0
            del held[keep:]
        job.n_past = keep
        job.pending = prompt[keep:]
        job.n_evaluated = len(job.pending)
        p = job.params
        job.sampler = NativeSampler(
            self._lib,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            repeat_penalty=p.repeat_penalty,
            repeat_last_n=p.repeat_last_n,
            seed=random.getrandbits(32) if p.seed is None else p.seed,
            n_vocab=self._model.n_vocab,
        )
        if p.repeat_penalty != 1.0:
            for token in prompt:
                job.sampler.accept(token)
        self._active.append(job)

    def _step(self) -> None:
        for job in [j for j in self._active if j.should_stop()]:
            self._end(job, "cancelled")
        if not self._active:
            return
        plan = plan_batch(self._active, self._cap, self._prefill_chunk)
        # Rows in sequence-id order: with one KV stream per sequence, llama.cpp splits a batch
        # into separate forward passes wherever the ids stop increasing (measured: 2 to 5
        # passes per step in arrival order, one when sorted; 0.87x -> 0.95x of a raw loop).
        plan.sort(key=lambda item: item[0].seq_id)
        entries: list[BatchEntry] = []
        rows: list[tuple[Job, int]] = []  # jobs that sample after this step, and their row
        for job, n in plan:
            if job.next_token is not None:
                entries.append((job.next_token, job.n_past, job.seq_id, True))
                rows.append((job, len(entries) - 1))
                continue
            finishing = n == len(job.pending)
            for i, token in enumerate(job.pending[:n]):
                entries.append((token, job.n_past + i, job.seq_id, finishing and i == n - 1))
            if finishing:
                rows.append((job, len(entries) - 1))
        with self._guard:
            try:
                self._native.decode(entries)
            except DecodeError as exc:
                self._decode_failed(plan, exc)
                return
            self.steps += 1
            self.evaluated += len(entries)
            self._cap = min(self._native.n_batch, self._cap * 2)
            for job, n in plan:
                if job.next_token is not None:
                    self.tokens[job.seq_id].append(job.next_token)
                    job.next_token = None
                else:
                    self.tokens[job.seq_id].extend(job.pending[:n])
                    del job.pending[:n]
                job.n_past += n
            ctx_ptr = self._native.ptr
            for job, row in rows:
                assert job.sampler is not None
                self._sampled(job, job.sampler.sample(ctx_ptr, row))
        # Round-robin: who goes first (and so gets the batch when it is short) changes per step.
        if len(self._active) > 1:
            self._active.append(self._active.pop(0))

    def _sampled(self, job: Job, token: int) -> None:
        job.n_generated += 1
        if self._model.is_eog(token):
            self._end(job, "eog")
            return
        job.say(job.text.feed(self._model.token_to_piece(token)))
        if job.text.stopped:
            self._end(job, "stop")
        elif job.n_generated >= job.params.max_tokens or job.n_past >= self._native.n_ctx_seq:
            self._end(job, "length")
        else:
            job.next_token = token

    def _decode_failed(self, plan: list[tuple[Job, int]], exc: DecodeError) -> None:
        """Under the guard. "No KV slot": retry smaller; anything else: fail those jobs."""
        n_tokens = sum(n for _, n in plan)
        if exc.code == _NO_KV_SLOT and n_tokens > 1:
            self._cap = max(1, n_tokens // 2)
            logger.warning("no KV slot for %d tokens: retrying with %d", n_tokens, self._cap)
            return
        for job, _ in plan:
            # Whatever the failed batch wrote for this sequence is undone; the rest stays.
            self._native.seq_rm(job.seq_id, job.n_past, -1)
            del self.tokens[job.seq_id][job.n_past :]
            self._active.remove(job)
            with self._cond:
                self._by_seq.pop(job.seq_id, None)
            job.fail(DecodeError(f"sequence {job.seq_id}: {exc}", exc.code))

    def _end(self, job: Job, reason: FinishReason) -> None:
        if job in self._active:
            self._active.remove(job)
        with self._cond:
            self._by_seq.pop(job.seq_id, None)
        job.finish(reason)
