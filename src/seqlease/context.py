"""The :class:`Context`: one model, one llama.cpp context, a pool of sequences."""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref
from collections.abc import Sequence as SequenceOf
from types import TracebackType
from typing import Any, Literal

from typing_extensions import Self

from seqlease.backends.base import Backend, BackendInfo
from seqlease.backends.completion import CompletionBackend
from seqlease.backends.probe import Probe
from seqlease.backends.session import SessionBackend
from seqlease.checks import check_int, check_text, check_timeout, describe
from seqlease.detection import Capabilities, detect
from seqlease.errors import BackendUnavailableError, ModelLoadError
from seqlease.lease import AsyncLease, Lease
from seqlease.model_info import ModelInfo
from seqlease.model_path import default_model_path
from seqlease.native.library import load_library
from seqlease.native.params import resolve
from seqlease.options import MAX_SEQUENCES, ContextOptions, ModelOptions, default_threads
from seqlease.persist.fingerprint import model_fingerprint
from seqlease.pool import PoolStats, SequencePool, Slot
from seqlease.pool.origin import caller_origin
from seqlease.request.params import sanitize
from seqlease.request.prompt import prompt_text
from seqlease.request.text import USER_TURN_MARKERS
from seqlease.sequence import Sequence

__all__ = ["MAX_SEQUENCES", "Context", "default_threads"]

logger = logging.getLogger("seqlease")

_BACKENDS = ("auto", "session", "completion")


class Context:
    """One model, one llama.cpp context, and a pool of ``sequences`` independent sequences.

    Each sequence is a separate conversation with its own KV memory of ``n_ctx`` tokens. Lease
    one per request with :meth:`lease` (or :meth:`alease` in asyncio code): it is always given
    back, cleared, whatever happens inside the ``with`` block.

    Example:
        >>> with seqlease.Context(sequences=2) as ctx:  # doctest: +SKIP
        ...     with ctx.lease(timeout=0) as seq:
        ...         print(seq.id)

    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        sequences: int = 2,
        n_ctx: int = 2048,
        backend: Literal["auto", "session", "completion"] = "auto",
        n_threads: int | None = None,
        max_waiting: int | None = None,
        n_batch: int = 512,
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        n_gpu_layers: int | Literal["auto"] = "auto",
        main_gpu: int = 0,
        tensor_split: SequenceOf[float] | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        flash_attn: bool | Literal["auto"] = "auto",
        type_k: str = "f16",
        type_v: str = "f16",
        kv_unified: bool | None = None,
        n_ubatch: int | None = None,
        n_threads_batch: int | None = None,
        offload_kqv: bool = True,
    ) -> None:
        """Load the model and create the context.

        Prompt prefixes are shared: tokens another sequence (or the prefix cache) holds are
        copied, not evaluated again. ``prefix_cache_tokens`` (default: ``n_ctx``) is the KV
        memory the cache may keep on top of the leases' own, so it never takes a lease's room;
        ``prefix_cache=False`` shares nothing. ``kv_unified=None`` lets seqlease choose: one KV
        stream per sequence where the binding offers it (0.3.15+; a result then never depends
        on what other sequences do); ``True`` puts all sequences in one buffer, where sequences
        holding the same prefix share its memory.

        The llama.cpp options mean what they mean to llama.cpp (see docs "GPU and memory").
        ``n_gpu_layers="auto"`` offloads every layer where the build supports GPU offload;
        ``flash_attn="auto"`` turns it on for a quantized ``type_v`` (llama.cpp needs it) or
        a GPU, and off on the CPU (replies then never depend on how prompts were batched).
        :attr:`model_options` and :attr:`context_options` show what was chosen.

        Raises:
            ValueError: an argument is out of range (the message says the allowed range).
            TypeError: a switch is not a bool, or ``tensor_split`` not a sequence of numbers.
            ModelLoadError: the model file is missing or not GGUF, or was replaced while it
                was loading.
            BackendUnavailableError: the requested backend cannot run on this binding, or it
                cannot honour an option asked for (the message names both).

        """
        if max_waiting is not None:
            check_int("max_waiting", max_waiting, 0, 1 << 30)
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, not {describe(backend)}")
        if model_path is not None and not isinstance(model_path, (str, os.PathLike)):
            raise TypeError(
                f"model_path must be a str, an os.PathLike or None, not {describe(model_path)}"
            )
        if isinstance(model_path, str):
            check_text("model_path", model_path)
        model = ModelOptions(
            n_gpu_layers=n_gpu_layers,
            main_gpu=main_gpu,
            tensor_split=tensor_split,  # type: ignore[arg-type]  # checked, made a tuple
            use_mmap=use_mmap,
            use_mlock=use_mlock,
        )
        context = ContextOptions(
            sequences=sequences,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            flash_attn=flash_attn,
            type_k=type_k,
            type_v=type_v,
            kv_unified=kv_unified,
            offload_kqv=offload_kqv,
            prefix_cache=prefix_cache,
            prefix_cache_tokens=prefix_cache_tokens,
        )
        self.capabilities: Capabilities = detect()
        chosen = self._choose_backend(backend)
        self.model_path = os.fspath(model_path if model_path is not None else default_model_path())
        lib = load_library()
        #: How llama.cpp loads the weights, every "auto" settled for this build.
        self.model_options, context = resolve(lib, model, context)
        #: The llama.cpp context as created, every "auto" and ``None`` settled.
        self.context_options = context
        try:
            loading = model_fingerprint(self.model_path)
        except OSError:
            loading = None  # the backend's load says what is wrong with the path
        self._backend: Backend = (
            SessionBackend(lib, self.model_path, self.model_options, context)
            if chosen == "session"
            else CompletionBackend(self.model_path, self.model_options, context)
        )
        if loading is not None and self._backend.model_info.fingerprint != loading:
            # ModelInfo takes its fingerprint after llama.cpp has read the file: where the
            # file changed meanwhile, no one can tell which of the two the weights came from.
            self._backend.close()
            raise ModelLoadError(
                f"the model file {self.model_path!r} was replaced while it was loading: "
                "create the Context again"
            )
        logger.info(
            "context ready: %s backend, %d sequences x %d tokens, model %s, %s, %s",
            chosen,
            sequences,
            n_ctx,
            self.model_path,
            self.model_options,
            context,
        )
        self.sequences = sequences
        self.n_ctx = n_ctx
        #: Which backend generations run on (``.name``: ``"session"`` or ``"completion"``).
        self.backend = BackendInfo(chosen)
        self._pool = SequencePool(
            sequences,
            clear=self._backend.clear_sequence,
            max_waiting=max_waiting,
            on_idle_after_close=self._backend.close,
        )
        #: For tests and benchmarks only: what the engine holds, held between steps safely.
        self.probe: Probe = self._backend.make_probe(self._pool.slots)
        # A Context dropped without close(): free native memory once nothing refers to it
        # (every live lease holds a reference, so no lease can be out by then).
        self._finalizer = weakref.finalize(self, self._backend.close)

    @property
    def model(self) -> ModelInfo:
        """The loaded model: tokenizer, vocabulary, chat template, metadata."""
        return self._backend.model_info

    @property
    def kv_cache_bytes(self) -> int | None:
        """Bytes of KV cache llama.cpp allocated for this context (``None``: model shape unknown).

        All sequences' memory and the prefix cache's, by the formula in docs "GPU and memory".
        """
        return self._backend.kv_cache_bytes

    def _choose_backend(self, requested: str) -> str:
        """Pick the backend by feature detection; a forced one must be supported."""
        caps = self.capabilities
        why = "; ".join(caps.reasons)
        if requested == "auto":
            if caps.backend is None:
                raise BackendUnavailableError(
                    f"no backend can run on llama-cpp-python {caps.binding_version}: {why}"
                )
            logger.info("backend auto-selected: %s (%s)", caps.backend, why)
            return caps.backend
        supported = caps.session if requested == "session" else caps.completion
        if not supported:
            raise BackendUnavailableError(
                f"backend={requested!r} is unavailable on llama-cpp-python "
                f"{caps.binding_version}: {why}"
            )
        logger.info("backend %s forced by the caller (%s)", requested, why)
        return requested

    # -- leases -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Sequence:
        """Lease a sequence; the caller must call :meth:`Sequence.release`.

        Prefer :meth:`lease`. ``timeout=None`` waits as long as it takes, ``timeout=0`` fails at
        once when none is free. Waiters are served strictly first come, first served.

        Raises:
            PoolExhausted: no sequence became free within ``timeout``.
            TooManyWaiters: ``max_waiting`` callers are already queued.
            ContextClosedError: the context is closed.

        """
        slot, lease_number = self._pool.acquire(timeout, caller_origin())
        return self._handle(slot, lease_number)

    async def aacquire(self, timeout: float | None = None) -> Sequence:
        """Async :meth:`acquire`: waits without blocking the event loop; cancellation-safe."""
        slot, lease_number = await self._pool.aacquire(timeout, caller_origin())
        return self._handle(slot, lease_number)

    def _handle(self, slot: Slot, lease_number: int) -> Sequence:
        try:
            return Sequence(self, self._backend, self._pool, slot, lease_number, slot.origin)
        except BaseException:
            if self._pool.begin_release(slot, lease_number):
                self._pool.finish_release(slot)
            raise

    def lease(self, timeout: float | None = None) -> Lease:
        """Lease a sequence for a ``with`` block; it is released, cleared, whatever happens.

        ``with ctx.lease(timeout=0) as seq: ...``. Raises the same errors as :meth:`acquire`.
        """
        return Lease(self.acquire, check_timeout(timeout))

    def alease(self, timeout: float | None = None) -> AsyncLease:
        """Async :meth:`lease`, safe against cancellation while waiting and inside the block.

        ``async with ctx.alease() as seq: ...``.
        """
        return AsyncLease(self.aacquire, check_timeout(timeout))

    def complete(self, prompt: str, *, timeout: float | None = None, **sampling: Any) -> str:
        """Stateless completion of ``prompt`` ("Option C": no session, no memory kept).

        Takes a sequence for the call only (``timeout`` as in :meth:`lease`). Sampling as in
        :meth:`Sequence.generate`; ``stop=None`` stops at user-turn markers (``USER:``).

        Raises:
            EmptyPromptError: ``prompt`` is empty or whitespace only.

        """
        prompt_text("prompt", prompt)  # before the lease, like the sampling arguments
        if sampling.get("stop") is None:
            sampling["stop"] = USER_TURN_MARKERS
        params = sanitize(**sampling)  # before the lease: bad arguments never take a sequence
        with self.lease(timeout) as seq:
            return seq.generate_with(prompt, params).result().text

    # -- lifecycle --------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool: sizes, counters, who holds what, prefixes reused."""
        prefixes = self._backend.prefix_stats()
        return dataclasses.replace(
            self._pool.stats(),
            prefix_hits=prefixes.hits,
            prefix_tokens_reused=prefixes.tokens_reused,
            prefix_cached_tokens=prefixes.cached,
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._pool.closed

    def close(self, timeout: float | None = None) -> None:
        """Stop leasing, fail waiters, and free native memory once every lease is back.

        Waits up to ``timeout`` seconds (``None``: as long as it takes) for leases held by
        other threads. Leases still out afterwards (or held by this thread) stay usable; the
        native memory is freed when the last of them is released. Idempotent.
        """
        if self._pool.close(timeout):
            self._finalizer()
        elif out := self._pool.stats().leased:
            logger.warning(
                "context closed with %d leases out: native memory is freed when the last is "
                "released",
                out,
            )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        state = "closed" if self.closed else "open"
        return (
            f"<seqlease.Context {state} {self.backend.name} sequences={s.size} "
            f"leased={s.leased} waiting={s.waiting}>"
        )
