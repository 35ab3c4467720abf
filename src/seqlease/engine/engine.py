"""The engine: every active sequence of one llama.cpp context decoded together, step by step.

Policy and state only, no thread: the session backend's worker calls :meth:`Engine.advance`
under its guard, with the requests it took from its queue. One step reads as

* **admit**: drop what the callers gave up on, set up new replies (a sampler each), and place
  each on the longest prompt prefix held anywhere (or let it wait for a reader of one);
* **plan**: how many tokens each reply gets (:func:`~seqlease.engine.schedule.plan_batch`,
  pure), cut into ``llama_decode`` calls (:func:`~seqlease.engine.schedule.decode_calls`);
* per call, **execute** (check, decode, sample: native work returning plain data), **commit**
  (the ledger and each reply's position), **deliver** (text to the reply writers, and ends).

A new request first looks for its prompt's prefix in the other sequences and the prefix cache
(:mod:`seqlease.engine.prefixes`) and copies what it finds. If another reply is still
evaluating a longer common prefix, the new one waits for it instead of evaluating the same
tokens too: 8 requests that arrive together with one new system prompt evaluate it once.

Per-reply work (setting up, placing, checking its batch entries, sampling, writing text) is
isolated: an exception there fails that reply alone, at once, and the engine serves on. The
decode itself is shared: a failed decode fails the replies of that call, and only a fatal code
(the context is unusable) raises out of :meth:`Engine.advance`, for the worker to fail all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from seqlease.engine.layout import KvLayout
from seqlease.engine.ledger import KvLedger
from seqlease.engine.prefixes import Prefixes, PrefixStats
from seqlease.engine.schedule import decode_calls, plan_batch
from seqlease.engine.seam import BatchEntry, Sampler, Samplers, Seam
from seqlease.errors import DecodeError
from seqlease.request.job import FinishReason, Request
from seqlease.request.logprobs import TokenLogprob, token_logprob
from seqlease.request.reply import ReplyWriter

__all__ = ["Engine"]

logger = logging.getLogger("seqlease.engine")

_NO_KV_SLOT = 1


@dataclass(eq=False)
class _Running:
    """What the engine keeps of one reply while it runs; only the engine changes it."""

    request: Request
    reply: ReplyWriter
    sampler: Sampler
    #: Prompt tokens still to evaluate.
    pending: list[int] = field(default_factory=list)
    #: Tokens the sequence holds.
    n_past: int = 0
    #: Sampled, to be decoded next step.
    next_token: int | None = None

    @property
    def seq_id(self) -> int:
        return self.request.seq_id

    @property
    def decoding(self) -> bool:
        """Whether the prompt is done and the reply feeds back its own tokens."""
        return self.next_token is not None


@dataclass(frozen=True)
class _Executed:
    """What one ``llama_decode`` call did: plain data, before anything is committed."""

    #: Each reply in the call, and the tokens it evaluated.
    pieces: tuple[tuple[_Running, int], ...]
    #: Replies that sampled their next token (with its log-probability when asked).
    sampled: tuple[tuple[_Running, int, TokenLogprob | None], ...]
    #: Replies that failed on their own, and at which stage.
    faults: tuple[tuple[_Running, Exception, str], ...]


class Engine:
    """Decodes the replies of every sequence of one context in shared batches.

    Not thread-safe: one thread at a time (the worker, under its guard) calls every method.
    ``release(request)`` is called when a reply ends, before its caller hears, so the sequence
    accepts its next request at once.
    """

    def __init__(
        self,
        native: Seam,
        samplers: Samplers,
        layout: KvLayout,
        *,
        release: Callable[[Request], None],
        share_prefixes: bool = True,
        prefill_chunk: int = 128,
    ) -> None:
        """Serve ``native``'s sequences, laid out as ``layout``; their memory must be empty."""
        self._native = native
        self._samplers = samplers
        self._vocab = native.model
        self._release = release
        self._prefill_chunk = prefill_chunk
        # A call of at most n_ubatch tokens is not cut by llama.cpp beyond its own split.
        self._budget = min(native.n_batch, native.n_ubatch)
        self._cap = self._budget  # shrinks after "no KV slot", grows back after success
        self._streams = not native.kv_unified
        #: What each sequence holds: the one door to KV memory.
        self.ledger = KvLedger(native)
        self._prefixes = Prefixes(self.ledger, layout, enabled=share_prefixes)
        self._active: list[_Running] = []
        self._waiting: list[_Running] = []  # for another reply's prefix
        #: Decode steps so far, tokens they evaluated, and replies ended, for tests and
        #: benchmarks.
        self.steps = 0
        self.evaluated = 0
        self.completed = 0

    @property
    def busy(self) -> bool:
        """Whether a reply is running or waiting to be placed."""
        return bool(self._active or self._waiting)

    def running(self, seq_id: int) -> bool:
        """Whether the engine holds a reply of ``seq_id``."""
        return any(r.seq_id == seq_id for r in (*self._active, *self._waiting))

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens reused across sequences so far (plain ints: readable from any thread)."""
        return self._prefixes.stats()

    # -- one step ---------------------------------------------------------------------------

    def advance(self, incoming: Iterable[Request] = ()) -> None:
        """Admit ``incoming``, then run one step of every reply."""
        for running in [r for r in (*self._active, *self._waiting) if r.request.should_stop()]:
            self._end(running, "cancelled")
        for request in incoming:
            self._start(request)
        for running in list(self._waiting):
            self._isolated(running, "starting", self._place)
        if not self._active:
            return
        plan = plan_batch(self._active, self._cap, self._prefill_chunk)
        evaluated = self.evaluated
        for call in decode_calls(plan, streams=self._streams):
            executed = self._execute(call)
            if executed is None:
                break  # no KV slot: the rest of the step waits for a smaller batch
            self._commit(executed)
            self._deliver(executed)
        if self.evaluated > evaluated:
            self.steps += 1
        # Round-robin: who goes first (and so gets the batch when it is short) changes per step.
        if len(self._active) > 1:
            self._active.append(self._active.pop(0))

    def clear(self, seq_id: int) -> None:
        """Keep what the idle ``seq_id`` holds in the prefix cache, then empty it."""
        try:
            self._prefixes.keep(seq_id)
        except Exception:  # the cache is an optimisation: clearing must happen regardless
            logger.exception("caching the prefix of sequence %d failed", seq_id)
        self.ledger.clear(seq_id)

    def cancel_all(self) -> None:
        """End every reply as cancelled (the worker is stopping)."""
        for running in (*self._active, *self._waiting):
            self._end(running, "cancelled")

    def abandon(self) -> None:
        """Forget every reply and free its sampler (the worker died; the table fails them)."""
        for running in (*self._active, *self._waiting):
            self._drop(running)

    # -- admit --------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        """Set up the reply's sampler; it then waits to be placed."""
        reply = ReplyWriter(request)
        if request.should_stop():
            self._release(request)
            reply.finish("cancelled")
            return
        try:
            sampler = self._samplers(request.params, request.constraint)
        except Exception as exc:
            self._release(request)
            reply.fail(exc, "starting")
            return
        running = _Running(request, reply, sampler)
        self._waiting.append(running)
        if request.params.repeat_penalty != 1.0:
            self._isolated(running, "starting", self._accept_prompt)

    def _accept_prompt(self, running: _Running) -> None:
        for token in running.request.prompt:
            running.sampler.accept(token)

    def _place(self, running: _Running) -> None:
        """Start the reply from the longest prefix held anywhere, or let it wait for a reader.

        The last two prompt tokens are always evaluated: the last one's logits start the
        reply, and a batch of one token would round differently from the evaluation without
        a copied prefix (see :func:`seqlease.engine.schedule.plan_batch`).
        """
        prompt, seq_id, ledger = running.request.prompt, running.seq_id, self.ledger
        limit = max(0, len(prompt) - 2)
        own = min(ledger.common(seq_id, prompt), limit)
        # Only a reader evaluating from a shareable start will hold a prefix to copy.
        reading = (
            r.request.prompt
            for r in self._active
            if r.pending and ledger.shareable(r.seq_id) == ledger.n_tokens(r.seq_id)
        )
        choice = self._prefixes.choose(prompt, seq_id, own=own, limit=limit, reading=reading)
        if choice is None:
            return
        source, n = choice
        if source < 0:
            keep = ledger.reuse(seq_id, n)
        else:
            keep = self._prefixes.copy(source, seq_id, n, own=own)
        running.n_past = keep
        running.pending = prompt[keep:]
        running.reply.n_evaluated = len(running.pending)
        self._waiting.remove(running)
        self._active.append(running)

    # -- execute, commit, deliver -------------------------------------------------------------

    def _execute(self, call: Sequence[tuple[_Running, int]]) -> _Executed | None:
        """Check, decode and sample one call; ``None`` where llama.cpp found no KV slot."""
        faults: list[tuple[_Running, Exception, str]] = []
        entries: list[BatchEntry] = []
        pieces: list[tuple[_Running, int]] = []
        rows: list[tuple[_Running, int]] = []  # replies that sample after this call, and their row
        for running, n in call:
            own = _entries(running, n)
            try:
                self._native.check_batch(own)
            except Exception as exc:  # this reply's tokens are bad, not the others'
                faults.append((running, exc, "checking its batch"))
                continue
            entries.extend(own)
            pieces.append((running, n))
            if own[-1][3]:
                rows.append((running, len(entries) - 1))
        if entries:
            try:
                self._native.decode(entries)
            except DecodeError as exc:
                if exc.code == _NO_KV_SLOT and len(entries) > 1:
                    self._cap = max(1, len(entries) // 2)
                    logger.warning(
                        "no KV slot for %d tokens: retrying with %d", len(entries), self._cap
                    )
                    return None
                if exc.code is not None and exc.code < -1:
                    raise  # llama.cpp's context is unusable after a fatal decode error
                return self._call_failed(pieces, faults, exc)
            except Exception as exc:  # nothing was evaluated: the call's replies fail
                return self._call_failed(pieces, faults, exc)
            self.evaluated += len(entries)
            self._cap = min(self._budget, self._cap * 2)
        sampled: list[tuple[_Running, int, TokenLogprob | None]] = []
        for running, row in rows:
            try:
                sampled.append((running, *self._sample(running, row)))
            except Exception as exc:
                faults.append((running, exc, "sampling"))
        return _Executed(tuple(pieces), tuple(sampled), tuple(faults))

    def _sample(self, running: _Running, row: int) -> tuple[int, TokenLogprob | None]:
        token = running.sampler.sample(row)
        params = running.request.params
        if not params.logprobs:
            return token, None
        logits = self._native.logit_row(row)
        return token, token_logprob(logits, token, params.top_logprobs, self._vocab)

    def _call_failed(
        self,
        pieces: list[tuple[_Running, int]],
        faults: list[tuple[_Running, Exception, str]],
        exc: Exception,
    ) -> _Executed:
        """The decode failed: whatever it wrote is undone, and its replies fail."""
        for running, _ in pieces:
            self.ledger.truncate(running.seq_id, running.n_past)
            error = exc
            if isinstance(exc, DecodeError):
                error = DecodeError(f"sequence {running.seq_id}: {exc}", exc.code)
            faults.append((running, error, "decoding"))
        return _Executed((), (), tuple(faults))

    def _commit(self, executed: _Executed) -> None:
        """Record what the call evaluated: the ledger, each reply's position and pending."""
        for running, n in executed.pieces:
            if running.next_token is not None:
                self.ledger.appended(running.seq_id, (running.next_token,))
                running.next_token = None
            else:
                self.ledger.appended(running.seq_id, running.pending[:n])
                del running.pending[:n]
            running.n_past += n

    def _deliver(self, executed: _Executed) -> None:
        """Each sampled token to its reply writer; replies that end, or failed, end."""
        for running, exc, stage in executed.faults:
            self._fail(running, exc, stage)
        for running, token, logprob in executed.sampled:
            try:
                reason = running.reply.add_token(token, self._vocab, logprob)
            except Exception as exc:
                self._fail(running, exc, "writing the reply")
                continue
            # The sequence holds n_past tokens and this one would be next: prompt plus reply
            # stay within n_ctx, as on the completion backend.
            if reason is None and running.n_past + 1 >= self._native.n_ctx_seq:
                reason = "length"
            if reason is None:
                running.next_token = token
            else:
                self._end(running, reason)

    # -- ends ---------------------------------------------------------------------------------

    def _isolated(self, running: _Running, stage: str, work: Callable[[_Running], None]) -> None:
        """Run one reply's own work; if it raises, that reply alone fails."""
        try:
            work(running)
        except Exception as exc:
            self._fail(running, exc, stage)

    def _end(self, running: _Running, reason: FinishReason) -> None:
        self.completed += 1
        self._drop(running)
        self._release(running.request)
        running.reply.finish(reason)

    def _fail(self, running: _Running, exc: Exception, stage: str) -> None:
        self.completed += 1
        self._drop(running)
        self._release(running.request)
        running.reply.fail(exc, stage)

    def _drop(self, running: _Running) -> None:
        """Forget the reply's engine-side state and free its sampler."""
        if running in self._active:
            self._active.remove(running)
        if running in self._waiting:
            self._waiting.remove(running)
        running.sampler.close()


def _entries(running: _Running, n: int) -> list[BatchEntry]:
    """The batch entries of ``n`` tokens of ``running``; logits where it samples next."""
    seq_id, at = running.seq_id, running.n_past
    if running.next_token is not None:
        return [(running.next_token, at, seq_id, True)]
    finishing = n == len(running.pending)
    return [
        (token, at + i, seq_id, finishing and i == n - 1)
        for i, token in enumerate(running.pending[:n])
    ]
