"""The :class:`Sequence` handle: one lease of one llama.cpp sequence."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from typing_extensions import Unpack

from seqlease.checks import check_callable, check_timeout, describe
from seqlease.errors import BackendUnavailableError, SequenceReleasedError, StateError
from seqlease.native.guidance import Constraint
from seqlease.native.library import binding_version
from seqlease.persist.sequence_state import SequenceState
from seqlease.request.job import Channel, Request
from seqlease.request.params import SamplingKwargs, SamplingParams, sanitize
from seqlease.request.prompt import prompt_tokens
from seqlease.request.stream import AsyncGeneration, Generation
from seqlease.request.structured import check_for_model

if TYPE_CHECKING:
    from seqlease.backends.base import Backend
    from seqlease.context import Context
    from seqlease.model_info import ModelInfo
    from seqlease.pool import SequencePool, Slot

__all__ = ["Sequence"]

logger = logging.getLogger("seqlease.pool")


class Sequence:
    """A leased llama.cpp sequence. Get one from :meth:`Context.lease` or :meth:`Context.acquire`.

    The handle is valid from the lease until :meth:`release`; afterwards every use raises
    :class:`SequenceReleasedError`, even once the same ``seq_id`` is leased to someone else,
    whose state this handle can never touch. A handle dropped without release is reclaimed
    (and a :class:`LeaseLeakWarning` names where it was leased).
    """

    __slots__ = (
        "__weakref__",
        "_backend",
        "_closers",
        "_context",
        "_finalizer",
        "_lease_number",
        "_pool",
        "_slot",
    )

    def __init__(
        self,
        context: Context,
        backend: Backend,
        pool: SequencePool,
        slot: Slot,
        lease_number: int,
        origin: str,
    ) -> None:
        """Internal: :meth:`Context.acquire` makes handles."""
        self._context = context
        self._backend = backend
        self._pool = pool
        self._slot = slot
        self._lease_number = lease_number
        self._closers: list[Callable[[], None]] = []
        self._finalizer = weakref.finalize(self, pool.handle_lost, slot, lease_number, origin)

    @property
    def id(self) -> int:
        """The llama.cpp ``seq_id`` (readable even after release, for logs)."""
        return self._slot.seq_id

    @property
    def context(self) -> Context:
        """The :class:`Context` this sequence belongs to."""
        return self._context

    @property
    def released(self) -> bool:
        """Whether this handle has been released (or reclaimed)."""
        return not self._pool.is_current(self._slot, self._lease_number)

    @property
    def model(self) -> ModelInfo:
        """The model of this sequence's :class:`Context` (tokenizer, vocabulary, template)."""
        return self._backend.model_info

    @property
    def n_ctx(self) -> int:
        """Tokens this sequence can hold: prompt and reply together."""
        return self._backend.n_ctx

    @property
    def n_tokens(self) -> int:
        """Tokens currently held in this sequence's KV memory."""
        self.check()
        return self._backend.n_tokens(self._slot.seq_id)

    def check(self) -> None:
        """Raise :class:`SequenceReleasedError` unless this handle still owns its sequence."""
        if not self._pool.is_current(self._slot, self._lease_number):
            raise SequenceReleasedError(
                f"sequence {self._slot.seq_id} (lease #{self._lease_number}) was released; "
                "lease a new one with `with ctx.lease() as seq:`"
            )

    def generate(
        self,
        prompt: str | list[int],
        *,
        abort: threading.Event | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> Generation:
        """Evaluate ``prompt`` on this sequence and stream the reply as text chunks.

        ``prompt`` is everything the sequence should hold before the reply (text, or token
        ids). Text is a raw prompt that writes its own markup: control-token text in it
        (``<|im_start|>``) becomes control tokens, as in llama.cpp. To keep untrusted text
        plain, pass ``seq.model.tokenize(text)`` instead, or use a ChatSession. Tokens the
        sequence already holds as a common prefix are kept, not evaluated again, so
        re-sending a growing conversation costs only its new part. Concurrent
        generations on different sequences share each decode step. Setting ``abort`` stops
        the generation within one step.

        Sampling: ``temperature=0.6`` (0 = greedy), ``top_p=0.9``, ``top_k=40``,
        ``min_p=0``, ``repeat_penalty=1`` (off), ``max_tokens=256``, ``seed=None``,
        ``stop=None`` (none). Non-finite numbers fall back to these defaults.

        Structured output: ``grammar`` (GBNF) or ``json_schema`` (a JSON Schema dict or a
        pydantic model class) constrains the reply; ``logit_bias`` (``{token id: bias}``)
        shifts logits; ``logprobs=True`` (with ``top_logprobs`` alternatives, 0 to 20) puts a
        :class:`TokenLogprob` per generated token in :attr:`Result.logprobs`.

        Raises:
            SequenceReleasedError: the handle was released.
            GrammarError: the grammar or schema cannot be compiled (nothing was queued).
            ContextOverflowError: the prompt does not fit in the sequence's ``n_ctx``.
            SequenceBusyError: this sequence is already generating (a reply that was closed,
                left early or dropped does not count).
            EmptyPromptError: the prompt is empty or whitespace only.
            TypeError: the prompt is not text or token ids, or ``abort`` has no ``is_set()``.
            ValueError: a sampling argument is out of range, or a token id outside the
                vocabulary.

        """
        return self.generate_with(prompt, sanitize(**sampling), abort=abort)

    def generate_with(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        abort: threading.Event | None = None,
    ) -> Generation:
        """:meth:`generate` with ready-made :class:`SamplingParams`."""
        checked = self._check_request(prompt, params, abort)
        return Generation(self.id, lambda channel: self._start(checked, params, abort, channel))

    def agenerate(
        self,
        prompt: str | list[int],
        *,
        abort: threading.Event | None = None,
        **sampling: Unpack[SamplingKwargs],
    ) -> AsyncGeneration:
        """Async :meth:`generate`: ``async for chunk in seq.agenerate(...)``.

        Cancelling the task that iterates, leaving the loop early, or dropping the object
        stops this sequence's generation within one step.
        """
        return self.agenerate_with(prompt, sanitize(**sampling), abort=abort)

    def agenerate_with(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        abort: threading.Event | None = None,
    ) -> AsyncGeneration:
        """:meth:`agenerate` with ready-made :class:`SamplingParams`."""
        checked = self._check_request(prompt, params, abort)
        return AsyncGeneration(
            self.id, lambda channel: self._start(checked, params, abort, channel)
        )

    def _check_request(
        self, prompt: object, params: object, abort: object
    ) -> tuple[list[int], Constraint | None]:
        """Everything about a request that can be wrong, checked before anything is queued.

        Also compiles the reply's grammar here, on the caller's thread: the engine thread,
        which every lease shares, never waits for a compile.
        """
        self.check()
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"params must be SamplingParams (from seqlease.sanitize), not {describe(params)}"
            )
        if abort is not None:
            check_callable("abort", abort, "is_set")
        model = self._backend.model_info
        tokens = prompt_tokens(prompt, model, self.n_ctx)
        return tokens, check_for_model(model, params)

    def _start(
        self,
        checked: tuple[list[int], Constraint | None],
        params: SamplingParams,
        abort: threading.Event | None,
        channel: Channel,
    ) -> Request:
        self.check()
        tokens, constraint = checked
        return self._backend.generate(self._slot.seq_id, tokens, params, abort, channel, constraint)

    def fork(self, timeout: float | None = None) -> Sequence:
        """Lease another sequence holding a copy of this one's memory now.

        For n-best answers, branching agents and "regenerate": each branch continues from the
        same tokens without evaluating them again (llama.cpp's ``seq_cp``). Waits for a free
        sequence as :meth:`Context.acquire` does (``timeout`` likewise); release the new handle
        like any other (``with seq.fork() as other:``). On the completion backend no sequence
        holds tokens, so the fork starts empty too.

        Raises:
            SequenceReleasedError: this handle was released.
            PoolExhausted: no sequence became free within ``timeout``.

        """
        self.check()
        child = self._context.acquire(check_timeout(timeout))
        try:
            self.check()  # released by another thread while we waited for a sequence
            self._backend.fork_sequence(self._slot.seq_id, child.id)
        except BaseException:
            child.release()
            raise
        return child

    def save_state(self) -> bytes:
        """Save the sequence's memory and tokens as bytes, for :meth:`load_state` later.

        Framed with the model's fingerprint, the llama-cpp-python version and the cache
        settings, and a SHA-256 of the whole: damage is caught before llama.cpp reads a byte.
        The sequence must not be generating. About 23 KB a token for SmolLM2-135M with an f16
        cache: the size of the KV memory it holds.

        Raises:
            SequenceReleasedError: the handle was released.
            SequenceBusyError: the sequence is generating.
            BackendUnavailableError: this backend (completion) or binding keeps no memory
                per sequence that can be saved.

        """
        self.check()
        backend = self._backend
        memory_format = self._memory_format()
        tokens, memory = backend.save_sequence(self._slot.seq_id)
        return SequenceState(
            tokens, memory, self.model.fingerprint, binding_version() or "", memory_format
        ).to_bytes()

    def load_state(self, data: bytes) -> None:
        """Replace what this sequence holds by a state from :meth:`save_state`.

        The state may come from another :class:`Context` or process, of the same model file,
        llama-cpp-python version and cache settings (``type_k``, ``type_v``, ``flash_attn``).
        Everything is checked before llama.cpp reads a byte; a refused state leaves the
        sequence as it was, and one llama.cpp refuses leaves it empty.

        Raises:
            StateError: the state is damaged (truncated, corrupted), from another model,
                larger than this sequence's ``n_ctx``, or written by another binding version
                or cache setting.
            SequenceReleasedError: the handle was released.
            SequenceBusyError: the sequence is generating.
            BackendUnavailableError: this backend (completion) or binding cannot load one.
            TypeError: ``data`` is not bytes.

        """
        self.check()
        memory_format = self._memory_format()
        state = SequenceState.from_bytes(data)
        state.check_fits(
            self.id,
            model=self.model.fingerprint,
            binding=binding_version() or "",
            memory_format=memory_format,
            n_ctx=self.n_ctx,
            n_vocab=self.model.n_vocab,
        )
        if not self._backend.load_sequence(self._slot.seq_id, state.tokens, state.memory):
            raise StateError(
                f"llama.cpp refused this state of {len(state.tokens)} tokens (see logger "
                f"'seqlease.llama'); sequence {self.id} is empty"
            )

    def _memory_format(self) -> dict[str, str]:
        memory_format = self._backend.memory_format
        if memory_format is None:
            raise BackendUnavailableError(
                f"the {self._backend.name} backend cannot save or load a sequence's memory "
                "(the completion backend keeps none per sequence; a binding without "
                "llama_state_seq_* cannot): ChatSession.save() still works, and resuming "
                "re-evaluates the conversation"
            )
        return memory_format

    def shift(self, held: list[int], start: int) -> bool:
        """A context shift: if this sequence starts with ``held``, remove ``held[start:]``.

        The tokens after ``held`` move down to close the gap (llama.cpp ``seq_rm`` +
        ``seq_add``), keeping their memory instead of evaluating them again; a chat uses it to
        drop its oldest turns. Returns ``False``, with nothing changed, where the sequence
        holds something else or its memory cannot move positions (a recurrent model, the
        completion backend). The sequence must not be generating.

        Raises:
            SequenceReleasedError: the handle was released.
            SequenceBusyError: the sequence is generating.

        """
        self.check()
        return self._backend.cut_sequence(self._slot.seq_id, held, start)

    def add_closer(self, close: Callable[[], None]) -> None:
        """Run ``close`` when the lease ends, before the memory is cleared (newest first)."""
        if not callable(close):
            raise TypeError(f"close must be callable, not {describe(close)}")
        self.check()
        self._closers.append(close)

    def remove_closer(self, close: Callable[[], None]) -> None:
        """Forget a closer added with :meth:`add_closer` (a session closed on its own)."""
        if close in self._closers:
            self._closers.remove(close)

    def release(self) -> None:
        """Close bound sessions, clear the memory, and return the sequence to the pool.

        Idempotent: a second call on the same handle does nothing (it is counted in stats).
        """
        if self._begin_release():
            self._pool.finish_release(self._slot)

    async def arelease(self) -> None:
        """:meth:`release` for asyncio code: the clearing runs off the event loop.

        It completes even if the awaiting task is cancelled meanwhile.
        """
        if self._begin_release():
            await self._pool.afinish_release(self._slot)

    def _begin_release(self) -> bool:
        """Claim the release and close bound sessions; ``False`` if released already."""
        if not self._pool.begin_release(self._slot, self._lease_number):
            return False
        self._finalizer.detach()
        try:
            while self._closers:
                closer = self._closers.pop()
                try:
                    closer()
                except Exception:
                    logger.exception("closing a session of sequence %d failed", self.id)
        except BaseException:  # Ctrl-C in a closer: the slot is still cleared, not left out
            self._pool.finish_release(self._slot)
            raise
        return True

    def __enter__(self) -> Sequence:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "leased"
        return f"<seqlease.Sequence id={self.id} lease=#{self._lease_number} {state}>"
