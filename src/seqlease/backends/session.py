"""The session backend: one llama.cpp context with ``n_seq_max`` independent sequences."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from types import ModuleType

from seqlease.backends.base import PrefixStats
from seqlease.engine.engine import Engine
from seqlease.engine.layout import plan_layout
from seqlease.errors import BackendUnavailableError
from seqlease.model_info import ModelInfo
from seqlease.native.context import NativeContext
from seqlease.native.memory import resolve_memory_api
from seqlease.native.model import NativeModel
from seqlease.native.names import max_sequences
from seqlease.options import ContextOptions, ModelOptions
from seqlease.request.job import Channel, Job
from seqlease.request.params import SamplingParams

__all__ = ["SessionBackend"]


class SessionBackend:
    """Loads the model and the context, and hands both to the :class:`Engine` that owns them."""

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
        )
        self.model = NativeModel(lib, model_path, model)
        try:
            native = NativeContext(lib, self.model, memory, context, layout)
        except BaseException:
            self.model.close()
            raise
        self.model_info = ModelInfo(self.model)
        self.n_ctx = native.n_ctx_seq
        #: How the KV memory is split between leases and the prefix cache.
        self.layout = layout
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
        self.engine = Engine(lib, native, layout, share_prefixes=context.prefix_cache)

    def generate(
        self,
        seq_id: int,
        prompt: list[int],
        params: SamplingParams,
        abort: threading.Event | None,
        channel: Channel,
    ) -> Job:
        """Queue one generation on ``seq_id``; its text and end go to ``channel``."""
        return self.engine.generate(seq_id, prompt, params, abort, channel)

    def clear_sequence(self, seq_id: int) -> None:
        """Stop the sequence's generation, then remove every token from its KV memory."""
        self.engine.clear_sequence(seq_id)

    def n_tokens(self, seq_id: int) -> int:
        """Tokens a sequence holds, as llama.cpp reports it (highest position + 1)."""
        return self.engine.n_tokens(seq_id)

    def fork_sequence(self, src: int, dst: int) -> None:
        """Make the idle, empty ``dst`` hold a copy of everything ``src`` holds."""
        self.engine.fork_sequence(src, dst)

    def cut_sequence(self, seq_id: int, prefix: Sequence[int], start: int) -> bool:
        """If the idle sequence starts with ``prefix``, drop ``prefix[start:]`` from it."""
        return self.engine.cut_sequence(seq_id, prefix, start)

    def save_sequence(self, seq_id: int) -> tuple[tuple[int, ...], bytes]:
        """The idle sequence's tokens and its memory."""
        return self.engine.save_sequence(seq_id)

    def load_sequence(self, seq_id: int, tokens: Sequence[int], data: bytes) -> bool:
        """Replace the idle sequence's memory by ``data``; ``False`` (and empty) if refused."""
        return self.engine.load_sequence(seq_id, tokens, data)

    def prefix_stats(self) -> PrefixStats:
        """Prompt tokens reused across sequences so far."""
        return self.engine.prefix_stats()

    @property
    def freed(self) -> bool:
        """Whether the native memory has been freed."""
        return self.engine.freed

    def close(self) -> None:
        """Stop the engine, then free the context and the model; idempotent."""
        self.engine.close()
