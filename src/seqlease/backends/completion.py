"""The completion backend ("Option C"): the model through the high-level ``llama_cpp.Llama``.

``Llama`` runs one sequence and has no lock of its own (two threads on one instance crash or
hang), so this backend owns a single worker thread that runs every generation, strictly one
after the other in arrival order. It keeps nothing per leased sequence: each generation gets
its whole prompt, and ``Llama``'s own prefix reuse (the tokens it still holds from the previous
call) is an optimisation, not state a sequence can observe.

Tokens come from ``Llama.generate`` (the token generator that ``create_completion`` itself runs)
rather than from ``create_completion``'s text chunks, whose streaming in llama-cpp-python 0.3.x
cannot be counted per token, can overshoot ``max_tokens``, reports the same ``"stop"`` for an
end-of-generation token and a stop string, and loses or withholds characters around invalid or
split UTF-8. Text is assembled exactly as the session backend does it (:class:`TextAssembler`):
same UTF-8 handling, same stop strings held back across chunks, same finish reasons.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from seqlease.backends.probe import DecodeObserver, Probe
from seqlease.backends.worker import JobWorker
from seqlease.engine.prefixes import PrefixStats
from seqlease.errors import (
    BackendUnavailableError,
    DecodeError,
    ModelLoadError,
    NativeError,
    SeqleaseError,
)
from seqlease.model_info import ModelInfo
from seqlease.model_path import check_model_file
from seqlease.native.guidance import Constraint
from seqlease.native.library import load_library
from seqlease.native.model import NativeModel
from seqlease.native.params import check_kv_shape, kv_cache_bytes, llama_kwargs
from seqlease.options import ContextOptions, ModelOptions, is_quantized
from seqlease.pool.slot import Slot
from seqlease.request.job import FinishReason, Request
from seqlease.request.logprobs import token_logprob
from seqlease.request.params import SamplingParams
from seqlease.request.reply import ReplyWriter, fail_request

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["CompletionBackend"]

logger = logging.getLogger("seqlease.engine")

_NO_STATE = (
    "the completion backend keeps no memory per sequence, so none can be saved or loaded: "
    "use backend='session' (ChatSession.save() works on both: resuming there re-evaluates)"
)

# llama-cpp-python turns every failed llama_decode into a bare RuntimeError with this text.
_DECODE_FAILED = re.compile(r"llama_decode returned (-?\d+)")


class CompletionBackend(JobWorker):
    """Runs generations through one ``llama_cpp.Llama`` on one worker thread, FIFO.

    Same interface as :class:`~seqlease.backends.session.SessionBackend`. Generations of
    different leased sequences do not share decode steps here: they wait their turn. The
    worker holds the guard for the whole of each generation; hold it to touch ``llama``.
    """

    name = "completion"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        model: ModelOptions,
        context: ContextOptions,
    ) -> None:
        """Load the model into a ``Llama`` of ``n_ctx`` tokens and start the worker thread.

        Both option objects come resolved (:func:`seqlease.native.params.resolve`).
        ``context.sequences`` is the size of the pool in front of this backend: any number of
        leases share the one ``Llama``, so it only bounds the ids :meth:`generate` accepts.
        ``n_ctx`` bounds prompt plus reply (``Llama`` may round its own context up).

        Raises:
            ModelLoadError: the file is missing, not GGUF, or llama.cpp cannot load it.
            BackendUnavailableError: ``Llama`` takes no keyword for an option asked for.

        """
        path = check_model_file(model_path)
        # Before the Llama exists: llama.cpp's log then goes to logger "seqlease.llama", not
        # to llama-cpp-python's handler that prints to stderr.
        lib = load_library()
        import llama_cpp

        kwargs = llama_kwargs(llama_cpp.Llama, model, context)
        if is_quantized(context.type_k) or is_quantized(context.type_v):
            # Llama loads the model and makes the context in one call; a quantized type that
            # does not fit the heads must be refused before (older llama.cpp aborts on it).
            probe = NativeModel(lib, path, vocab_only=True)
            try:
                check_kv_shape(probe.kv_shape(), context)
            finally:
                probe.close()
        try:
            # verbose=False: Llama prints its system info and metadata to stderr otherwise.
            # It also silences file descriptors 1 and 2 of the whole process while it loads.
            llama = llama_cpp.Llama(
                model_path=os.fspath(path),
                seed=random.getrandbits(32),  # every generation sets its own seed anyway
                verbose=False,
                **kwargs,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"llama.cpp could not load {str(path)!r} through llama_cpp.Llama: the GGUF file "
                "is damaged, too large for memory, or uses an architecture this "
                f"llama-cpp-python build does not know (see logger 'seqlease.llama'): {exc}"
            ) from exc
        super().__init__("seqlease-completion", sequences=context.sequences, n_ctx=context.n_ctx)
        #: The ``llama_cpp.Llama``; not thread-safe: touch it only while holding the guard.
        self.llama: Llama = llama
        try:
            self.model = NativeModel.borrow(lib, llama.model, path)
        except BaseException:
            llama.close()
            raise
        self.model_info = ModelInfo(self.model)
        # Partial KV removal fails on recurrent and hybrid models: Llama then evaluates the
        # whole prompt again, and n_evaluated must say so.
        self._partial_rm = not self.model.is_recurrent()
        #: Bytes of the KV cache llama.cpp allocated (``None`` for a model of unknown shape).
        self.kv_cache_bytes = kv_cache_bytes(
            self.model.kv_shape(), int(lib.llama_n_ctx(llama.ctx)), context
        )
        #: No sequence holds memory of its own here, so none can be saved.
        self.memory_format: dict[str, str] | None = None
        #: Jobs the worker has taken from the queue and ended (any way), for tests and stats.
        self.completed = 0
        self._hits = 0
        self._reused = 0
        self._start()

    def make_probe(self, slots: Callable[[], tuple[Slot, ...]]) -> Probe:
        """The :class:`Probe` of this backend (``slots``: its pool's)."""
        return _CompletionProbe(self, slots)

    # -- caller side ------------------------------------------------------------------------

    def clear_sequence(self, seq_id: int) -> None:
        """Cancel the sequence's queued or running generation and wait until it has ended.

        There is nothing else to clear: no tokens are kept per sequence.
        """
        self.stop_sequence(seq_id)

    def n_tokens(self, seq_id: int) -> int:
        """Always 0: the completion backend keeps no tokens per sequence.

        Every generation sends its whole prompt; what ``Llama`` still holds from the last
        generation (of whichever sequence) is a cache any sequence may reuse, not its memory.
        """
        return 0

    def fork_sequence(self, src: int, dst: int) -> None:
        """Nothing to copy: no sequence holds tokens here (see :meth:`n_tokens`)."""

    def cut_sequence(self, seq_id: int, prefix: Sequence[int], start: int) -> bool:
        """``False``: no sequence holds tokens here; the next prompt is evaluated as sent."""
        return False

    def save_sequence(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """Refused: the completion backend keeps no memory per sequence."""
        raise BackendUnavailableError(_NO_STATE)

    def load_sequence(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Refused: the completion backend keeps no memory per sequence."""
        raise BackendUnavailableError(_NO_STATE)

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens ``Llama`` kept from the previous generation, whichever lease ran it.

        Its one sequence is this backend's whole prefix cache: no budget, no eviction.
        """
        return PrefixStats(
            hits=self._hits, tokens_reused=self._reused, cached=int(self.llama.n_tokens)
        )

    def _abandon(self) -> None:
        """Nothing native is held across replies (a grammar is llguidance's own memory)."""

    def _free(self) -> None:
        self.model.close()
        self.llama.close()

    # -- worker thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        while (taken := self._jobs.take(wait=True, limit=1)) is not None:
            for job in taken:
                self._run(job)
                self.completed += 1

    def _run(self, request: Request) -> None:
        """Run one request to its end; never raises, always ends it."""
        reason: FinishReason = "cancelled"
        reply = ReplyWriter(request)
        try:
            if not request.should_stop():
                with self._guard:
                    reason = self._generate(request, reply)
        except Exception as exc:  # a native failure or a bug: fail this reply, keep serving
            logger.warning("completion for sequence %d failed: %r", request.seq_id, exc)
            with self._guard, contextlib.suppress(Exception):
                # The prefix bookkeeping may not match the KV cache after a failed decode:
                # the next generation evaluates its whole prompt.
                llama: Any = self.llama  # reset() is unannotated in llama-cpp-python
                llama.reset()
            self._jobs.forget(request)
            fail_request(request, _map_error(exc, request.seq_id))
            return
        # The sequence is free for its next request before the caller hears of the end.
        self._jobs.forget(request)
        reply.finish(reason)

    def _generate(self, request: Request, reply: ReplyWriter) -> FinishReason:
        """Under the guard: stream one reply into ``reply`` and return why it ended."""
        llama, p = self.llama, request.params
        prompt = request.prompt
        # Prompt plus reply within n_ctx, as on the session backend (max_tokens is the job's
        # own check). Llama's own check would allow more: llama.cpp rounds the context up
        # (128 -> 256), while Llama.input_ids holds only the n_ctx it was given.
        room = self.n_ctx - len(prompt)
        reply.n_evaluated = self._keep_prefix(prompt)
        if reply.n_evaluated < len(prompt):
            self._hits += 1
            self._reused += len(prompt) - reply.n_evaluated
        seed = random.getrandbits(32) if p.seed is None else p.seed & 0xFFFFFFFF
        # What create_completion does before it calls generate(): the sampler chain that
        # generate() builds reads both.
        llama.set_seed(seed)
        llama.last_n_tokens_size = p.repeat_last_n
        raw = _RawLogits()
        # The grammar (compiled at the call) filters the logits before Llama's sampler sees
        # them and is moved on here, never inside Llama.
        grammar = request.constraint
        tokens = llama.generate(
            prompt,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            temp=p.temperature,
            repeat_penalty=p.repeat_penalty,
            reset=True,  # keep the common prefix of what Llama holds, evaluate the rest
            logits_processor=_processors(p, raw, grammar),
        )
        try:
            return self._follow(request, reply, tokens, room, raw, grammar)
        finally:
            # Stops Llama between tokens; its next call reuses whatever prefix matches.
            tokens.close()

    def _follow(
        self,
        request: Request,
        reply: ReplyWriter,
        tokens: Iterator[int],
        room: int,
        raw: _RawLogits,
        grammar: Constraint | None,
    ) -> FinishReason:
        """Take ``Llama``'s tokens into ``reply`` until one ends it; why it ended."""
        model, p = self.model, request.params
        for token in tokens:
            if grammar is not None:
                grammar.accept(token)
            logprob = None
            if p.logprobs and raw.last is not None:
                logprob = token_logprob(raw.last, token, p.top_logprobs, model)
            reason = reply.add_token(token, model, logprob)
            if reason is None and reply.n_generated >= room:
                reason = "length"
            if reason is None and request.should_stop():
                reason = "cancelled"
            if reason is not None:
                return reason
        return "length"  # generate() never ends on its own; kept for the type checker

    def _keep_prefix(self, prompt: list[int]) -> int:
        """Let ``Llama`` keep at most all but the last two prompt tokens; how many it evaluates.

        ``Llama.generate`` (0.3.x) keeps the longest common prefix of the tokens it holds and
        the prompt, evaluating as little as the last prompt token, or none when it holds the
        prompt with its logits current. A one-token batch rounds differently from the
        evaluation of a whole prompt, so an earlier lease's prompt would change a greedy
        reply: as the session engine does, the last two are always evaluated. Lowering
        ``Llama.n_tokens`` to that prefix makes ``generate`` keep exactly it (it removes
        the KV cells after it); where partial removal fails, it evaluates the whole prompt.
        """
        llama = self.llama
        common = 0
        for a, b in zip(llama.input_ids[: llama.n_tokens].tolist(), prompt, strict=False):
            if a != b:
                break
            common += 1
        keep = min(common, len(prompt) - 2)
        if keep <= 0 or not self._partial_rm:
            llama.n_tokens = 0  # nothing kept: generate() resets and evaluates it all
            return len(prompt)
        llama.n_tokens = keep
        return len(prompt) - keep


class _RawLogits:
    """A logits processor that keeps a copy of the raw logits ``Llama`` samples from.

    It runs before any other processor and before ``Llama``'s own sampler stages, on the
    logits of the whole vocabulary in token-id order (0.2 and 0.3 alike).
    """

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.last = np.array(scores, dtype=np.float32, copy=True)
        return scores


def _processors(params: SamplingParams, raw: _RawLogits, grammar: Constraint | None) -> Any:
    """The ``LogitsProcessorList`` for logprobs, logit bias and grammar, or ``None``."""
    from llama_cpp import LogitsProcessorList

    processors: list[Any] = []
    if params.logprobs:
        processors.append(raw)
    if params.logit_bias:
        ids = np.array([token for token, _ in params.logit_bias], dtype=np.intp)
        biases = np.array([bias for _, bias in params.logit_bias], dtype=np.float32)

        def bias(input_ids: Any, scores: Any) -> Any:
            scores[ids] += biases
            return scores

        processors.append(bias)
    if grammar is not None:
        processors.append(lambda input_ids, scores: grammar.restrict(scores))
    return LogitsProcessorList(processors) if processors else None


def _map_error(exc: BaseException, seq_id: int) -> SeqleaseError:
    """A seqlease error for what ``Llama`` raised, with the original as its cause."""
    error: SeqleaseError
    if isinstance(exc, SeqleaseError):
        return exc
    match = _DECODE_FAILED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is not None:
        error = DecodeError(f"sequence {seq_id}: {exc}", int(match.group(1)))
    else:
        error = NativeError(f"sequence {seq_id}: the completion backend failed: {exc!r}")
    error.__cause__ = exc
    return error


class _CompletionProbe(Probe):
    """What tests and benchmarks may see of the completion backend: no sequence holds tokens."""

    def __init__(self, backend: CompletionBackend, slots: Callable[[], tuple[Slot, ...]]) -> None:
        super().__init__(backend._guard, slots)  # the probe is part of the backend
        self._backend = backend

    @property
    def steps(self) -> int:
        return self._backend.completed

    @property
    def evaluated(self) -> int:
        return 0

    @property
    def completed(self) -> int:
        return self._backend.completed

    @property
    def kv_unified(self) -> bool:
        return True  # one sequence: nothing to split

    @property
    def freed(self) -> bool:
        return self._backend.freed

    @property
    def sequence_ids(self) -> range:
        return range(len(self._slots()))

    def held(self, seq_id: int) -> tuple[int, ...]:
        return ()

    def native_pos_max(self, seq_id: int) -> int:
        return -1

    def context_ptr(self) -> Any:
        return self._backend.llama.ctx

    def append(self, seq_id: int, tokens: Sequence[int]) -> None:
        raise BackendUnavailableError("the completion backend keeps no tokens per sequence")

    def observe_decodes(self, observer: DecodeObserver | None) -> None:
        raise BackendUnavailableError("the completion backend decodes inside llama_cpp.Llama")
