"""The session backend: one llama.cpp context with ``n_seq_max`` sequences, batched.

Its worker thread owns the context: each iteration takes the new requests and, holding the
guard, lets the :class:`~seqlease.engine.engine.Engine` run one step of every reply. A release
clearing a sequence (and every other caller-side verb here) takes the guard between steps.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

from seqlease.backends.probe import DecodeObserver, Probe
from seqlease.backends.worker import JobWorker
from seqlease.engine.engine import Engine
from seqlease.engine.layout import KvLayout, plan_layout
from seqlease.engine.prefixes import PrefixStats
from seqlease.engine.sampling import native_samplers
from seqlease.errors import BackendUnavailableError, ContextClosedError, SequenceBusyError
from seqlease.model_info import ModelInfo
from seqlease.native.context import NativeContext
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel
from seqlease.native.names import max_sequences
from seqlease.options import ContextOptions, ModelOptions
from seqlease.pool.slot import Slot

__all__ = ["SessionBackend"]


class SessionBackend(JobWorker):
    """Loads the model and the context, and serves their sequences on one engine thread."""

    name = "session"

    def __init__(
        self,
        lib: ModuleType,
        model_path: str | os.PathLike[str],
        model: ModelOptions,
        context: ContextOptions,
    ) -> None:
        """Load the model and create the context (the model is freed again if that fails).

        Both option objects come resolved (:func:`seqlease.native.params.resolve`).
        """
        memory, reasons = resolve_memory_api(lib)
        if memory is None:
            raise BackendUnavailableError("; ".join(reasons))
        layout = plan_layout(
            sequences=context.sequences,
            n_ctx_seq=context.n_ctx,
            cache_tokens=context.cache_tokens,
            unified=bool(context.kv_unified),
            max_seq=max_sequences(lib),
            n_batch=context.n_batch,
        )
        native_model = NativeModel(lib, model_path, model)
        try:
            native = NativeContext(lib, native_model, memory, context, layout.cells)
        except BaseException:
            native_model.close()
            raise
        super().__init__("seqlease-engine", sequences=layout.sequences, n_ctx=layout.n_ctx_seq)
        self._native = native
        self.model_info = ModelInfo(native_model)
        #: How the KV memory is split between leases and the prefix cache.
        self.layout: KvLayout = layout
        #: Bytes of the KV cache llama.cpp allocated (``None`` for a model of unknown shape).
        self.kv_cache_bytes = native.kv_cache_bytes
        self.memory_format = (
            {
                "type_k": context.type_k,
                "type_v": context.type_v,
                "flash_attn": str(context.flash_attn),
                # llama.cpp loads a sequence's state only into a cache of as many streams.
                "kv_streams": str(1 if layout.unified else layout.n_seq_max),
            }
            if native.has_state
            else None
        )
        self.engine = Engine(
            native,
            native_samplers(lib, native),
            layout,
            release=self._jobs.forget,
            share_prefixes=context.prefix_cache,
        )
        self._start()

    def make_probe(self, slots: Callable[[], tuple[Slot, ...]]) -> Probe:
        """The :class:`Probe` of this backend (``slots``: its pool's)."""
        return _SessionProbe(self, slots)

    # -- caller side ------------------------------------------------------------------------

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation, then remove every token from its memory."""
        self.stop_sequence(seq_id)
        with self._guard:
            if not self._lifetime.freed:
                self.engine.clear(seq_id)

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        with self._guard:
            return self._native.seq_pos_max(seq_id) + 1

    def fork_sequence(self, src: int, dst: int) -> None:
        """Make the idle, empty ``dst`` hold a copy of everything ``src`` holds now."""
        with self._guard:
            ledger = self.engine.ledger
            ledger.copy(src, dst, ledger.n_tokens(src))

    def cut_sequence(self, seq_id: int, prefix: Sequence[int], start: int) -> bool:
        """If the idle ``seq_id`` starts with ``prefix``, drop ``prefix[start:]`` from it.

        The tokens after the prefix move down. Returns ``False``, with nothing changed, where
        the sequence holds something else or its memory cannot move positions.
        """
        with self._idle(seq_id):
            ledger = self.engine.ledger
            if ledger.common(seq_id, prefix) < len(prefix):
                return False
            return ledger.cut(seq_id, start, len(prefix))

    def save_sequence(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """The idle ``seq_id``'s tokens and its memory as llama.cpp writes it."""
        with self._idle(seq_id):
            return self.engine.ledger.save(seq_id)

    def load_sequence(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Replace the idle ``seq_id``'s memory by ``data`` (checked by the caller).

        Returns ``False``, with the sequence empty, when llama.cpp refuses it.
        """
        with self._idle(seq_id):
            return self.engine.ledger.load(seq_id, tokens, data)

    @contextlib.contextmanager
    def _idle(self, seq_id: int) -> Iterator[None]:
        """Hold the guard while ``seq_id`` runs no generation: its memory is ours to change."""
        requests = self._jobs.jobs_of(seq_id)
        if any(not r.channel.cancelled.is_set() for r in requests):
            raise _busy(seq_id)
        if threading.current_thread() is not self._thread:
            for request in requests:  # cancelled, and ending at the engine's next step
                request.channel.done.wait()
        with self._guard:
            if self._lifetime.freed:
                raise ContextClosedError("the context is closed: create a new Context")
            if self._jobs.jobs_of(seq_id):
                raise _busy(seq_id)
            yield

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens reused across sequences so far (read without waiting for a step)."""
        return self.engine.prefix_stats()

    # -- engine thread ----------------------------------------------------------------------

    def _serve(self) -> None:
        engine = self.engine
        while (incoming := self._jobs.take(wait=not engine.busy)) is not None:
            with self._guard:
                engine.advance(incoming)
        with self._guard:
            engine.cancel_all()

    def _abandon(self) -> None:
        self.engine.abandon()

    def _free(self) -> None:
        self._native.close()
        self._native.model.close()


class _SessionProbe(Probe):
    """What tests and benchmarks may see of the session backend."""

    def __init__(self, backend: SessionBackend, slots: Callable[[], tuple[Slot, ...]]) -> None:
        super().__init__(backend._guard, slots)  # the probe is part of the backend
        self._backend = backend
        self._native = backend._native

    @property
    def steps(self) -> int:
        return self._backend.engine.steps

    @property
    def evaluated(self) -> int:
        return self._backend.engine.evaluated

    @property
    def completed(self) -> int:
        return self._backend.engine.completed

    @property
    def kv_unified(self) -> bool:
        return self._backend.layout.unified

    @property
    def freed(self) -> bool:
        return self._backend.freed

    @property
    def sequence_ids(self) -> range:
        return range(self._native.n_seq_max)

    def held(self, seq_id: int) -> tuple[int, ...]:
        with self._guard:
            return self._backend.engine.ledger.tokens(seq_id)

    def native_pos_max(self, seq_id: int) -> int:
        with self._guard:
            return self._native.seq_pos_max(seq_id)

    def context_ptr(self) -> Any:
        return self._native.ptr

    def append(self, seq_id: int, tokens: Sequence[int]) -> None:
        with self._backend._idle(seq_id):
            ledger = self._backend.engine.ledger
            start = ledger.n_tokens(seq_id)
            self._native.decode([(t, start + i, seq_id, False) for i, t in enumerate(tokens)])
            ledger.appended(seq_id, tokens)

    def observe_decodes(self, observer: DecodeObserver | None) -> None:
        self._native.observer = observer


def _busy(seq_id: int) -> SequenceBusyError:
    return SequenceBusyError(
        f"sequence {seq_id} is generating: read that reply to its end or close() it before "
        "saving, loading or cutting the sequence's memory"
    )
